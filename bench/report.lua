-- The `done()` hook of every bench wrk script: when the run is over, print one
-- machine-readable line, `BENCH_JSON {...}`, that bench/common.py (run_wrk) parses.
-- Latencies are in microseconds (wrk's native unit). A script loads it with
--
--   dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")
--
-- (wrk has no module path of its own; this finds the file next to the script). A script
-- with more to report defines `report_extra()`, returning more `"key":value` JSON members.

function done(summary, latency, requests)
  local e = summary.errors
  local seconds = summary.duration / 1000000
  local extra = ""
  if report_extra then
    extra = "," .. report_extra()
  end
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"rps":%.2f,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}%s}\n',
    summary.requests, summary.duration, summary.bytes, summary.requests / seconds,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout, extra))
end
