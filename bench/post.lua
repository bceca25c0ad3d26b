-- wrk script for bench/run.py: POST a chat completion JSON body, print the results as JSON.
--
--   wrk -s bench/post.lua http://127.0.0.1:PORT/api/v1/chat/completions -- KEY MODE NONCE
--
-- KEY    sent as `Authorization: Bearer KEY`
-- MODE   same:     the same body on every request (the cache-hit path)
--        distinct: every request a new body (thread id and a counter in the prompt), so the
--                  gateway's cache always misses; NONCE keeps runs apart
-- NONCE  any string, part of every body
--
-- Every request is built in Lua by `request`, in both modes, so that the load generator costs
-- the same in every case. `done` prints one line, `BENCH {...}`, with the counts and the latency
-- percentiles in microseconds.

local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

local function body_for(nonce, n)
  return string.format(
    '{"model": "gemini", "messages": [{"role": "user", "content": "Say hello (bench %s %s)"}]}',
    nonce, n)
end

function init(args)
  local key = args[1] or "aio_mock_key"
  local mode = args[2] or "same"
  local nonce = args[3] or "0"
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. key
  local fixed = body_for(nonce, "same")
  local prefix = tostring(id) .. "-"
  request = function()
    if mode == "distinct" then
      counter = counter + 1
      return wrk.format(nil, nil, nil, body_for(nonce, prefix .. counter))
    end
    return wrk.format(nil, nil, nil, fixed)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "mean_us": %.1f, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
