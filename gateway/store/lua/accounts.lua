-- accounts.lua: the upstream accounts' states, after taking one out of rotation, putting one
-- back, or counting credits spent through them.
-- KEYS 1 upstream schedule
-- payload: accounts (as in lib_slots.lua), down {id, ms}, up (id), spend [[id, millicredits]]
-- A balance to watch counts what was spent since it was set: a new balance starts again at 0.
-- Returns, per account, {id, ms until back in rotation, slots free or false (unpaced), credits
-- left or false (no balance set)},
-- then whether `down` found its account in rotation (1/0).
local sched = KEYS[1]
local was_up = 0
if p.down then
  local field = 'a:' .. p.down[1] .. ':down'
  if (tonumber(redis.call('HGET', sched, field)) or 0) <= now then was_up = 1 end
  redis.call('HSET', sched, field, now + p.down[2])
end
if p.up then redis.call('HDEL', sched, 'a:' .. p.up .. ':down') end
local spend = {}
for _, item in ipairs(p.spend or {}) do spend[item[1]] = (spend[item[1]] or 0) + item[2] end
local out = {}
for _, a in ipairs(p.accounts) do
  local base = 'a:' .. a[1]
  local held = redis.call('HMGET', sched, base .. ':down', base .. ':used', base .. ':bal',
                          base .. ':spent')
  local down = (tonumber(held[1]) or 0) - now
  if down < 0 then down = 0 end
  local free = false
  if a[4] > 0 then
    free = math.max(0, math.floor(a[4] - used_last_minute(held[2]) + 1e-9))
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
  out[#out + 1] = {a[1], down, free, left}
end
out[#out + 1] = was_up
return out
