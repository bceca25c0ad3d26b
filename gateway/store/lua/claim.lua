-- claim.lua: where waiting requests stand, once the slots that came free have been granted.
-- KEYS 1 upstream schedule   2 slot queue   3 slot deadlines   4 slot waiters
--      5 waiting requests of teams with a reserved minimum
-- payload: tickets, accounts (as in lib_slots.lua), leave (those still waiting give up)
-- Returns, per ticket, {state (0 waiting, 1 granted, 2 gone), account or false, wait ms, probe}:
-- the wait is the estimate for one still waiting, or that had waited until it left.
local S = {sched = KEYS[1], queue = KEYS[2], due = KEYS[3], waiters = KEYS[4], minq = KEYS[5]}
local byid, order = load_accounts(S.sched, p.accounts)
advance(S, byid, order)
local out = {}
for i, ticket in ipairs(p.tickets) do
  local rec = redis.call('HGET', S.waiters, ticket)
  local account, probe = string.match(rec or '', '^g|([^|]*)|(%d)$')
  local w = parse_waiter(rec)
  if account then
    redis.call('HDEL', S.waiters, ticket)
    redis.call('ZREM', S.due, ticket)
    out[i] = {1, account, 0, tonumber(probe)}
  elseif w then
    local cands = candidates(byid, w.ids)
    local _, soonest = pick(cands)
    local wait = math.ceil(estimate(S, w.s, cands, soonest, w.team, w.min_iv))
    if p.leave then
      unqueue(S, ticket, w)
      out[i] = {2, false, wait, 0}
    else
      out[i] = {0, false, wait, 0}
    end
  else
    out[i] = {2, false, 0, 0}
  end
end
return out
