-- lib_slots.lua: the upstream accounts and the fair queue in front of them (prepended after
-- lib.lua to the scripts that use it: scripts.py `_SLOT_SCRIPTS`). Organisation-wide state, in
-- the `{org}` hash slot:
--   sched (hash)    a:<id>:tat   the account's GCRA theoretical arrival time (ms)
--                   a:<id>:down  ms until which it is out of rotation (it refused its key)
--                   a:<id>:why   the upstream status that took it out (401, 402)
--                   a:<id>:used  "minute|count|count the minute before": slots granted, to
--                                estimate those of the last 60 s (a sliding window)
--                   a:<id>:bal, a:<id>:spent  the balance to watch, and what was spent since
--                   v            the virtual clock: start tag of the last slot granted in order
--                   f:<team>     the team's last finish tag;  n:<team>  its requests waiting
--                   m:<team>     the team's reserved minimum (GCRA, one slot per min interval)
--   queue (zset)    waiting tickets scored by start tag;  due (zset)  tickets by deadline
--   minq (zset)     "team|ticket" of the waiting requests of teams with a reserved minimum
--   waiters (hash)  ticket -> "w|team|start|finish|min interval|account,..." while waiting,
--                   "g|account|probe" once granted (until its waiter claims it)
--
-- Start-time fair queuing (Goyal et al., 1996): a request of team t gets start = max(v,
-- f[t]) and finish = start + 1 / weight; f[t] = finish. Slots go to waiting requests in order
-- of start tag, and v follows the start tag of each one granted. A team back from idle starts
-- at v (no credit saved up while idle) and so goes ahead of a backlog, whose tags run ahead of
-- v; backlogged teams share the slots in proportion to their weights; an idle team's share
-- goes to the others. A team below its reserved minimum goes first.
--
-- Slots are granted when they come free, lazily: by any script that runs then (a request
-- arriving, a waiter asking where it stands). Accounts given as {id, interval ms (0: unpaced),
-- burst, per minute (0: unpaced), credits (millicredits, -1: none)}.

local now = clock()
local SCAN = 32  -- waiting requests looked at for each free slot
local KEEP_GRANT_MS = 30000  -- a slot granted to a waiter that never claims it is dropped then
local GRACE_MS = 2000  -- a waiter's place outlives its own deadline by this much

local function num(x)
  return string.format('%.17g', x)
end

-- The accounts with their state: by id, and in the payload's order.
local function load_accounts(sched, list)
  local fields = {}
  for _, a in ipairs(list) do
    fields[#fields + 1] = 'a:' .. a[1] .. ':tat'
    fields[#fields + 1] = 'a:' .. a[1] .. ':down'
  end
  local values = #fields > 0 and redis.call('HMGET', sched, unpack(fields)) or {}
  local byid, order = {}, {}
  for i, a in ipairs(list) do
    local down = tonumber(values[2 * i]) or 0
    local acct = {id = a[1], interval = a[2], burst = a[3], per_minute = a[4], credits = a[5],
                  tat = tonumber(values[2 * i - 1]) or 0, down = down, up = down <= now}
    byid[acct.id] = acct
    order[i] = acct
  end
  return byid, order
end

-- When the account has a slot (GCRA with burst): now, or later.
local function free_at(a)
  local at = a.tat - (a.burst - 1) * a.interval
  if at < now then return now end
  return at
end

-- Slots an account granted in the last 60 s, from its "minute|count|count before" (the
-- minute before weighted by how much of it is still inside the window).
local function used_last_minute(held)
  local minute, count, before = string.match(held or '', '^(%d+)|(%d+)|(%d+)$')
  if not minute then return 0 end
  local current = math.floor(now / 60000)
  local gone = (now % 60000) / 60000  -- of the minute before, this much is out of the window
  minute, count, before = tonumber(minute), tonumber(count), tonumber(before)
  if minute == current then return count + before * (1 - gone) end
  if minute == current - 1 then return count * (1 - gone) end
  return 0
end

-- Take the account's next slot, and count it.
local function book(sched, a)
  local tat = a.tat
  if tat < now then tat = now end
  a.tat = tat + a.interval
  local base = 'a:' .. a.id
  local current = math.floor(now / 60000)
  local count, before = 1, 0
  local minute, held, held_before = string.match(
    redis.call('HGET', sched, base .. ':used') or '', '^(%d+)|(%d+)|(%d+)$')
  if tonumber(minute) == current then
    count, before = tonumber(held) + 1, tonumber(held_before)
  elseif tonumber(minute) == current - 1 then
    before = tonumber(held)
  end
  redis.call('HSET', sched, base .. ':tat', num(a.tat),
             base .. ':used', string.format('%d|%d|%d', current, count, before))
end

-- The accounts a request may use: those in rotation; when none is, all of them (a probe: the
-- upstream's answer says whether one is back). Returns them, and whether they are probes.
local function candidates(byid, ids)
  local up, all = {}, {}
  for _, id in ipairs(ids) do
    local a = byid[id]
    if a then
      all[#all + 1] = a
      if a.up then up[#up + 1] = a end
    end
  end
  if #up > 0 then return up, false end
  return all, true
end

-- The candidate with a slot now (the one free for longest), or nil; and when the soonest comes.
local function pick(cands)
  local best, soonest = nil, math.huge
  for _, a in ipairs(cands) do
    local at = free_at(a)
    if at < soonest then soonest = at end
    if at <= now and (best == nil or a.tat < best.tat) then best = a end
  end
  return best, soonest
end

local function parse_waiter(rec)
  if not rec then return nil end
  local team, s, f, min_iv, ids = string.match(rec, '^w|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  if not team then return nil end
  local list = {}
  for id in string.gmatch(ids, '[^,]+') do list[#list + 1] = id end
  return {team = team, s = tonumber(s), f = tonumber(f), min_iv = tonumber(min_iv), ids = list}
end

local function waiting_less(sched, team)
  if redis.call('HINCRBY', sched, 'n:' .. team, -1) <= 0 then
    redis.call('HDEL', sched, 'n:' .. team)
  end
end

-- A waiting request leaves (gave up, or its place expired): its share was never used, so the
-- team's last finish tag goes back when this was its last request.
local function unqueue(S, ticket, w)
  redis.call('ZREM', S.queue, ticket)
  redis.call('ZREM', S.minq, w.team .. '|' .. ticket)
  redis.call('ZREM', S.due, ticket)
  redis.call('HDEL', S.waiters, ticket)
  waiting_less(S.sched, w.team)
  if tonumber(redis.call('HGET', S.sched, 'f:' .. w.team)) == w.f then
    redis.call('HSET', S.sched, 'f:' .. w.team, num(w.s))
  end
end

local function min_ready(sched, team)
  return (tonumber(redis.call('HGET', sched, 'm:' .. team)) or 0) <= now
end

local function min_book(sched, team, interval)
  local tat = tonumber(redis.call('HGET', sched, 'm:' .. team)) or 0
  if tat < now then tat = now end
  redis.call('HSET', sched, 'm:' .. team, num(tat + interval))
end

-- A slot of `a` for a request of `team` with start tag `s`; `in_order`: granted by start tag
-- (not ahead of its turn for the team's reserved minimum), so the virtual clock follows it.
local function take_slot(sched, a, team, s, min_iv, in_order)
  book(sched, a)
  if min_iv > 0 then min_book(sched, team, min_iv) end
  if in_order and s > (tonumber(redis.call('HGET', sched, 'v')) or 0) then
    redis.call('HSET', sched, 'v', num(s))
  end
end

-- The head of the queue of a team below its reserved minimum that an account can serve now.
local function below_minimum(S, byid)
  local seen = {}
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', S.minq, '-inf', '+inf')) do
    local team, ticket = string.match(member, '^([^|]*)|(.*)$')
    if not seen[team] then  -- a team's first is its head
      seen[team] = true
      if min_ready(S.sched, team) then
        local w = parse_waiter(redis.call('HGET', S.waiters, ticket))
        if w then
          local cands, probe = candidates(byid, w.ids)
          local a = pick(cands)
          if a then return {ticket = ticket, w = w, a = a, probe = probe} end
        end
      end
    end
  end
  return nil
end

-- The first waiting request, by start tag, that an account can serve now.
local function next_in_order(S, byid)
  local heads = redis.call('ZRANGEBYSCORE', S.queue, '-inf', '+inf', 'LIMIT', 0, SCAN)
  if #heads == 0 then return nil end
  local records = redis.call('HMGET', S.waiters, unpack(heads))
  for i, ticket in ipairs(heads) do
    local w = parse_waiter(records[i])
    if not w then
      redis.call('ZREM', S.queue, ticket)
    else
      local cands, probe = candidates(byid, w.ids)
      local a = pick(cands)
      if a then return {ticket = ticket, w = w, a = a, probe = probe} end
    end
  end
  return nil
end

-- Forget expired places, then give every free slot to the waiting request whose turn it is:
-- a team below its reserved minimum first, then by start tag.
local function advance(S, byid, order)
  for _, ticket in ipairs(redis.call('ZRANGEBYSCORE', S.due, '-inf', now)) do
    local w = parse_waiter(redis.call('HGET', S.waiters, ticket))
    if w then
      unqueue(S, ticket, w)
    else  -- a grant nobody claimed
      redis.call('ZREM', S.due, ticket)
      redis.call('HDEL', S.waiters, ticket)
    end
  end
  while true do
    local any = false
    for _, a in ipairs(order) do
      if free_at(a) <= now then any = true break end
    end
    if not any then return end
    local chosen = below_minimum(S, byid)
    local in_order = chosen == nil
    chosen = chosen or next_in_order(S, byid)
    if not chosen then return end
    local w = chosen.w
    take_slot(S.sched, chosen.a, w.team, w.s, w.min_iv, in_order)
    redis.call('ZREM', S.queue, chosen.ticket)
    redis.call('ZREM', S.minq, w.team .. '|' .. chosen.ticket)
    redis.call('HSET', S.waiters, chosen.ticket,
               'g|' .. chosen.a.id .. '|' .. (chosen.probe and '1' or '0'))
    redis.call('ZADD', S.due, now + KEEP_GRANT_MS, chosen.ticket)
    waiting_less(S.sched, w.team)
  end
end

-- How long a request of `team` with start tag `s` should wait: the soonest slot of its
-- accounts, then one slot for each request ahead of it, at the rate its accounts give
-- together; for a team with a reserved minimum, no longer than its minimum serves it.
local function estimate(S, s, cands, soonest, team, min_iv)
  local ahead = redis.call('ZCOUNT', S.queue, '-inf', '(' .. num(s))
  local rate = 0
  for _, a in ipairs(cands) do
    if a.interval > 0 then rate = rate + 1 / a.interval end
  end
  local wait = soonest - now
  if rate > 0 then wait = wait + ahead / rate end
  if min_iv > 0 then
    local ready = (tonumber(redis.call('HGET', S.sched, 'm:' .. team)) or 0) - now
    local by_minimum = math.max(ready, soonest - now)
                       + redis.call('ZCOUNT', S.minq, '-inf', '(' .. num(s)) * min_iv
    if by_minimum < wait then wait = by_minimum end
  end
  return wait
end

local SLOT_ADMIT, SLOT_QUEUED, SLOT_PACE, SLOT_FULL, SLOT_UNAVAILABLE = 0, 13, 6, 14, 15

-- The slot of a request let through: granted now, a place in the queue, or refused. Decides
-- and writes nothing for the request itself (other waiters' turns may be granted on the way);
-- `place_slot` writes the decision once the caller lets the request through.
-- ask: {accounts, usable, weight, min_interval_ms, max_waiting, queue_ms}
-- Returns {verdict, account, wait ms, probe, ...what place_slot needs}.
local function decide_slot(S, ticket, team, ask, task_account)
  local byid, order = load_accounts(S.sched, ask.accounts)
  advance(S, byid, order)
  local ids = ask.usable
  if task_account and byid[task_account] then ids = {task_account} end
  local cands, probe = candidates(byid, ids)
  if #cands == 0 then return {verdict = SLOT_UNAVAILABLE, wait = 0} end
  local state = redis.call('HMGET', S.sched, 'v', 'f:' .. team, 'n:' .. team)
  local v = tonumber(state[1]) or 0
  local s = tonumber(state[2]) or 0
  if s < v then s = v end
  local d = {ticket = ticket, team = team, ask = ask, s = s, f = s + 1 / ask.weight,
             probe = probe, ids = ids, wait = 0}
  local a, soonest = pick(cands)
  if a then
    d.verdict, d.account, d.acct = SLOT_ADMIT, a.id, a
    return d
  end
  local min_iv = 0
  for _, c in ipairs(cands) do
    if min_iv == 0 or c.interval < min_iv then min_iv = c.interval end
  end
  if (tonumber(state[3]) or 0) >= ask.max_waiting then
    d.verdict, d.wait = SLOT_FULL, soonest - now + min_iv
    return d
  end
  d.wait = estimate(S, s, cands, soonest, team, ask.min_interval_ms)
  if d.wait > ask.queue_ms then
    d.verdict, d.wait = SLOT_PACE, d.wait - ask.queue_ms
    return d
  end
  d.verdict = SLOT_QUEUED
  return d
end

local function place_slot(S, d)
  local ask = d.ask
  redis.call('HSET', S.sched, 'f:' .. d.team, num(d.f))
  if d.verdict == SLOT_ADMIT then
    take_slot(S.sched, d.acct, d.team, d.s, ask.min_interval_ms, true)
  elseif d.verdict == SLOT_QUEUED then
    redis.call('ZADD', S.queue, num(d.s), d.ticket)
    redis.call('ZADD', S.due, now + ask.queue_ms + GRACE_MS, d.ticket)
    redis.call('HSET', S.waiters, d.ticket, string.format('w|%s|%s|%s|%s|%s', d.team, num(d.s),
               num(d.f), num(ask.min_interval_ms), table.concat(d.ids, ',')))
    redis.call('HINCRBY', S.sched, 'n:' .. d.team, 1)
    if ask.min_interval_ms > 0 then
      redis.call('ZADD', S.minq, num(d.s), d.team .. '|' .. d.ticket)
    end
  end
end
