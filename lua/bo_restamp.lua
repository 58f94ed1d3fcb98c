--[[ bo_restamp: bring a waiting backorder under the allocation rules now in force.

A backorder is filled by the rules its bucket enforces (fill_backorders in _lib stops at a
waiting backorder stamped with another rules version, so none is filled by rules no longer
in force). When the rules change, the core re-stamps every waiting backorder with what the
new version says for its channel at its position: the protections of the other channels,
the channel's cap, the buyer limit, and the channel's priority (its place in the queue),
then fills the queue, which may now give more.

KEYS: as a reservation part of one line (part_keys): res, holds, events, stats, exc, rp,
      then agg, pos, hx, log, lx, sch, bq
ARGV:
  [1] cfg  JSON {log_max, ev_max, actor, source}
  [2] req  JSON {id, rv, pp (priority), pr ([[channel, protected]…] or absent), cap, bl}
Returns JSON:
  {"ok":1,"restamped":0|1,"filled":[id…]}    0: not waiting, or already stamped with rv
  {"err":"rules_stale","have":N} | {"err":"bad_request"}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if not is_text(req.id, 128) then return refuse('bad_request', 'reservation id must be 1-128 characters') end
if not is_int(req.rv, 0, 1e15) then return refuse('bad_request', 'rv must be a rules version') end
if not is_int(req.pp, 0, 1000000) then return refuse('bad_request', 'pp must be a priority') end
if req.pr ~= nil then
  if type(req.pr) ~= 'table' then return refuse('bad_request', 'pr must be a list') end
  for _, gp in ipairs(req.pr) do
    if type(gp) ~= 'table' or not is_text(gp[1], 64) or not is_int(gp[2], 0, 1e13) then
      return refuse('bad_request', 'pr entries are [channel, units]')
    end
  end
end
if req.cap ~= nil and not is_int(req.cap, 0, 1e13) then return refuse('bad_request', 'cap must be a whole number') end
if req.bl ~= nil and not is_int(req.bl, 1, 1e13) then return refuse('bad_request', 'bl must be a whole number') end
local idx, pk = part_keys(false, { { b = 0, n = 1 } })
if idx == nil then return pk end
local e = pk[1]
local lk = e.lines[1]
local have = bucket_rules_version(e.stats)
if have ~= req.rv then return refuse('rules_stale', 'the rules changed', { have = have }) end

local raw = redis.call('HGET', e.res, req.id)
local part = raw and cjson.decode(raw)
if not part or part.st ~= 'backordered' or part.rv == req.rv then
  return cjson.encode({ ok = 1, restamped = 0, filled = {} })
end
local now = now_ms()
local qty = part.lines[1].qty
if part.bq[1] ~= req.pp then
  -- its place in the queue follows its channel's priority now; its arrival is unchanged
  bo_dequeue(lk, part)
  redis.call('HINCRBY', lk.pos, 'bo', qty)
  redis.call('HINCRBY', lk.pos, 'bp:' .. req.pp, qty)
  part.bq = { req.pp, part.bq[2] }
  redis.call('ZADD', lk.bq, bo_score(req.pp, part.bq[2]), bo_member(part))
end
part.rv, part.pr, part.cap, part.bl = req.rv, req.pr, req.cap, req.bl
part.up = now
redis.call('HSET', e.res, req.id, cjson.encode(part))
local filled = fill_backorders(cfg, lk, e, now)
replen_check(cfg, lk.pos, e.rp, e.events, part.lines[1].sku, part.lines[1].loc, now)
return cjson.encode({ ok = 1, restamped = 1, filled = filled })
