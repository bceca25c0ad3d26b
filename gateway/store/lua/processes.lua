-- processes.lua: the gateway processes sharing this store, each with the config generation it
-- runs. A heartbeat records one process (and forgets those silent for `forget_ms`); every call
-- answers the organisation's config generation and what each process last said.
-- KEYS  1 processes hash   2 config generation
-- payload: process, generation (a heartbeat: omit both to only read), forget_ms
-- Returns {config generation, then (process, generation, ms since it was last heard) each}
local now = clock()
if p.process then
  redis.call('HSET', KEYS[1], p.process, string.format('%d|%d', p.generation, now))
end
local out = {tonumber(redis.call('GET', KEYS[2])) or 0}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local generation, seen = string.match(all[i + 1], '^(%d+)|(%d+)$')
  local age = now - tonumber(seen)
  if age > p.forget_ms then
    redis.call('HDEL', KEYS[1], all[i])
  else
    out[#out + 1] = all[i]
    out[#out + 1] = tonumber(generation)
    out[#out + 1] = age
  end
end
return out
