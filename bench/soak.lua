-- wrk script of `bench/run --soak`: every connection sends, in a fixed rotation, plain chat
-- requests, SSE streams (10 events 20 ms apart, from bench/stream_standin.py) and errors:
-- invalid JSON (MPC-API's own 400) and an unknown model (the stand-in's LiteLLM-shaped 400,
-- passed through). Each answer is classified by its body and counted as "<kind>:<status>";
-- done() adds the counts to report.lua's line as "answers".

local bodies = {
  chat = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello!"}]}',
  stream = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello!"}],' ..
    '"stream":true,"stand_in":{"events":10,"interval_ms":20}}',
  invalid_json = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":',
  unknown_model = '{"model":"no-such-model","messages":[{"role":"user","content":"Hello!"}]}',
}
-- Per 10 requests: 6 chats, 2 streams, 1 invalid JSON, 1 unknown model.
local rotation = {
  "chat", "stream", "chat", "invalid_json", "chat", "chat", "stream", "chat", "unknown_model", "chat",
}

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

local prepared = {}
local sent = 0
counts = {} -- per thread; read by report_extra() through thread:get

function init(args)
  for i, kind in ipairs(rotation) do
    prepared[i] = wrk.format("POST", nil, {["Content-Type"] = "application/json"}, bodies[kind])
  end
end

function request()
  sent = sent + 1
  return prepared[(sent - 1) % #prepared + 1]
end

-- chat: a chat.completion; stream: SSE events up to data: [DONE] and no error event;
-- mpcapi_error: MPC-API's own {"error": "<type>", ...}; litellm_error: {"error": {...}}.
local function kind_of(body)
  if body:sub(1, 6) == "data: " then
    if body:find("data: [DONE]", 1, true) and not body:find('"error"', 1, true) then
      return "stream"
    end
    return "stream_broken"
  end
  if body:find('"chat.completion"', 1, true) then return "chat" end
  if body:find('"error"%s*:%s*"') then return "mpcapi_error" end
  if body:find('"error"%s*:%s*{') then return "litellm_error" end
  return "other"
end

function response(status, headers, body)
  local key = kind_of(body) .. ":" .. status
  counts[key] = (counts[key] or 0) + 1
end

function report_extra()
  local total = {}
  for _, thread in ipairs(threads) do
    for key, n in pairs(thread:get("counts") or {}) do
      total[key] = (total[key] or 0) + n
    end
  end
  local members = {}
  for key, n in pairs(total) do
    members[#members + 1] = string.format('"%s":%d', key, n)
  end
  return '"answers":{' .. table.concat(members, ",") .. "}"
end

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")
