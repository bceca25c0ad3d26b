-- slot.lua: the upstream slot of a request let through without one (Redis Cluster: `admit`
-- runs in the team's hash slot, this in `{org}`; a request moving to another account).
-- KEYS 1 upstream schedule   2 slot queue   3 slot deadlines   4 slot waiters
--      5 waiting requests of teams with a reserved minimum
-- payload: ticket, team, slot (as in admit.lua), task_account (the task's account, if known)
-- Returns {verdict, account granted or false, wait or retry ms, probe 0/1}
local S = {sched = KEYS[1], queue = KEYS[2], due = KEYS[3], waiters = KEYS[4], minq = KEYS[5]}
local d = decide_slot(S, p.ticket, p.team, p.slot, p.task_account)
place_slot(S, d)
return {d.verdict, d.account or false, math.ceil(d.wait), d.probe and 1 or 0}
