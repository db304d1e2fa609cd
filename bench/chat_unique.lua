-- wrk script: like chat.lua, but every request asks something new (a per-thread, per-run
-- prefix and a counter in the message), so a response cache never answers it: each one is
-- a miss, forwarded to the stand-in LiteLLM and stored. Used by `bench/run --policy`; the
-- done() hook is report.lua's.

local counter = 0
local next_id = 0
local headers = {["Content-Type"] = "application/json"}
if os.getenv("BENCH_API_KEY") then  -- a client key, for MPC-API with MPCAPI_AUTH=keys
  headers["Authorization"] = "Bearer " .. os.getenv("BENCH_API_KEY")
end

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
  return wrk.format("POST", nil, headers, body)
end

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")
