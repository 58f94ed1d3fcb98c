--[[ expire_holds: reclaim the units of expired holds in one bucket, a bounded batch.

The worker finds candidates with ZRANGEBYSCORE on the bucket's holds zset and reads their
parts to learn which positions they touch; this script re-checks each one, so a hold that
was confirmed or released in between is left alone.

KEYS:
  [1] res    bucket hash of reservation parts
  [2] holds  bucket zset of held parts
  [3] events bucket outbox stream
  [4] stats  bucket hash of unit totals
  [5] exc    bucket hash of exceptions (not written here)
  [6] rp     bucket hash of open replenishment signals
  then, per candidate, per line of its part: agg | pos | hx | log | lx | sch | bq
Units a hold gives back fill the position's waiting backorders (fill_backorders).
ARGV:
  [1] cfg  JSON {log_max, ev_max, actor, source}
  [2] req  JSON {ids:[{id, n}]}     n = the line count the worker saw on the part
Returns JSON:
  {"ok":1,"expired":[id…],"units":N}      ids this call reclaimed something of
  {"err":"bad_request"}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if type(req.ids) ~= 'table' then return refuse('bad_request', 'ids must be a list') end
local want = 6
for _, c in ipairs(req.ids) do
  if not is_text(c.id, 128) or not is_int(c.n, 1, 10000) then return refuse('bad_request', 'bad candidate') end
  want = want + 7 * c.n
end
if want ~= #KEYS then return refuse('bad_request', 'KEYS do not match the candidates') end
local res_key, holds_key, ev_key, stats_key, rp_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6]

local now = now_ms()
local expired, units = {}, 0
local k = 7
for _, c in ipairs(req.ids) do
  local raw = redis.call('HGET', res_key, c.id)
  local rec = raw and cjson.decode(raw)
  if rec and #rec.lines == c.n and
     (rec.st == 'expired' or (rec.st == 'held' and rec.ex > 0 and rec.ex <= now)) then
    local changed = false
    local freed = {}
    for li, l in ipairs(rec.lines) do
      local o = k + 7 * (li - 1)
      local lk = { agg = KEYS[o], pos = KEYS[o + 1], hx = KEYS[o + 2], log = KEYS[o + 3], lx = KEYS[o + 4],
                   sch = KEYS[o + 5], bq = KEYS[o + 6] }
      local open = line_open(l)
      if open > 0 then
        freed[#freed + 1] = lk
        uncommit(cfg, lk, rec, open, 'expire', 'hold expired', now)
        redis.call('ZREM', lk.lx, lx_member(rec))
        stat(stats_key, -open, -open)
        l.released = l.released + open
        units = units + open
        changed = true
        lk.sku, lk.loc = l.sku, l.loc
      end
      redis.call('ZREM', lk.hx, c.id)
    end
    if rec.st ~= 'expired' then
      rec.st = 'expired'
      emit(cfg, ev_key, 'expired', rec.id, rec.ch, now, { expires_at = rec.ex })
      changed = true
    end
    redis.call('ZREM', holds_key, c.id)
    -- listed only when this call reclaimed something, so two reapers racing on one hold
    -- do not both report it
    if changed then
      rec.up = now
      redis.call('HSET', res_key, c.id, cjson.encode(rec))
      expired[#expired + 1] = c.id
    end
    for _, lk in ipairs(freed) do
      fill_backorders(cfg, lk, { res = res_key, events = ev_key, stats = stats_key }, now)
      replen_check(cfg, lk.pos, rp_key, ev_key, lk.sku, lk.loc, now)
    end
  elseif not rec or (rec.st ~= 'held' and rec.st ~= 'expired') then
    redis.call('ZREM', holds_key, c.id)
  end
  k = k + 7 * c.n
end
return cjson.encode({ ok = 1, expired = expired, units = units })
