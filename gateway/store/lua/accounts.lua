-- accounts.lua: the upstream accounts' states, after taking one out of rotation, putting one
-- back, or counting credits spent through them.
-- KEYS 1 upstream schedule
-- payload: accounts (as in lib_slots.lua), down {id, ms, upstream status}, up (id),
-- spend [[id, millicredits]]
-- A balance to watch counts what was spent since it was set: a new balance starts again at 0.
-- Returns, per account, {id, ms until back in rotation, the status that took it out (401, 402)
-- or false (in rotation), slots free or false (unpaced), credits left or false (no balance
-- set), slots granted in the last minute (an estimate: a sliding window)},
-- then whether `down` found its account in rotation (1/0).
local sched = KEYS[1]
local was_up = 0
if p.down then
  local base = 'a:' .. p.down[1]
  if (tonumber(redis.call('HGET', sched, base .. ':down')) or 0) <= now then was_up = 1 end
  redis.call('HSET', sched, base .. ':down', now + p.down[2], base .. ':why', p.down[3])
end
if p.up then redis.call('HDEL', sched, 'a:' .. p.up .. ':down', 'a:' .. p.up .. ':why') end
local spend = {}
for _, item in ipairs(p.spend or {}) do spend[item[1]] = (spend[item[1]] or 0) + item[2] end
local out = {}
for _, a in ipairs(p.accounts) do
  local base = 'a:' .. a[1]
  local held = redis.call('HMGET', sched, base .. ':down', base .. ':used', base .. ':bal',
                          base .. ':spent', base .. ':why')
  local down = (tonumber(held[1]) or 0) - now
  if down < 0 then down = 0 end
  local why = false
  if down > 0 then why = tonumber(held[5]) or false end
  local used = used_last_minute(held[2])
  local free = false
  if a[4] > 0 then
    free = math.max(0, math.floor(a[4] - used + 1e-9))
  end
  local left = false
  if a[5] >= 0 then
    local spent = tonumber(held[4]) or 0
    if tonumber(held[3]) ~= a[5] then
      spent = 0
      redis.call('HSET', sched, base .. ':bal', a[5], base .. ':spent', 0)
    end
    if spend[a[1]] then
      spent = redis.call('HINCRBY', sched, base .. ':spent', spend[a[1]])
    end
    left = a[5] - spent
  end
  out[#out + 1] = {a[1], down, why, free, left, math.floor(used + 1e-9)}
end
out[#out + 1] = was_up
return out
