-- wrk script: like chat.lua, but every request asks something new (a per-thread, per-run
-- prefix and a counter in the message), so a response cache never answers it: each one is
-- a miss, forwarded to the stand-in LiteLLM and stored. Used by `bench/run --policy`.

local counter = 0
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

function init(args)
  math.randomseed(os.time() + (id or 0))
  prefix = tostring(id or 0) .. "-" .. tostring(os.time()) .. "-" .. tostring(math.random(1, 1000000000))
end

function request()
  counter = counter + 1
  local body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello ' ..
    prefix .. "-" .. counter .. '"}]}'
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  local seconds = summary.duration / 1000000
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"rps":%.2f,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
    summary.requests, summary.duration, summary.bytes, summary.requests / seconds,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
