-- wrk script: POST a small, valid chat completion request; when the run is over, print the
-- BENCH_JSON line of report.lua that bench/harness.py parses.

wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello!"}]}'
wrk.headers["Content-Type"] = "application/json"
if os.getenv("BENCH_API_KEY") then  -- a client key, for MPC-API with MPCAPI_AUTH=keys
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_API_KEY")
end
if os.getenv("BENCH_PORTKEY_HOST") then  -- the Portkey gateway: which provider, and where it is
  wrk.headers["x-portkey-provider"] = "openai"
  wrk.headers["x-portkey-custom-host"] = os.getenv("BENCH_PORTKEY_HOST")
  wrk.headers["Authorization"] = "Bearer sk-bench"
end

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")
