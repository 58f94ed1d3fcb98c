--[[ reserve: take units of one or more positions for one channel, all or nothing (I1, I4),
under the allocation rules (I6): other channels' protections, the channel's cap, the
buyer limit, and location routing, all decided here, atomically.

KEYS (walked by part_keys):
  [1]                 rix      reservation index hash of the home bucket (only when req.idx)
  then, per part p (one per bucket the lines fall in):
    res    bucket hash of reservation parts      holds  bucket zset of held parts
    events bucket outbox stream                  stats  bucket hash of unit totals (+ rv)
    exc    bucket exceptions hash                rp     bucket open replenishment signals
    then, per line of p: agg  the SKU's totals hash (committed per channel and customer)
      then per candidate location of the line (one unless routed):
        pos  position hash | hx  position hold zset | log  position stream | lx  live index
        sch  dated schedule (inbound due and dated commitments per day)
        bq   backorder queue
ARGV:
  [1] cfg  JSON {max_qty, max_lines, max_hold, reclaim, log_max, ev_max, actor, source}
  [2] req  JSON {id, ch, hold (ms, 0 = confirmed at once), fp (request fingerprint),
                 idx (bool), home (bucket), rv (rules version the caller resolved with),
                 cu (customer id, optional), rd (requested day, optional: UTC days since
                 1970-01-01; a day before today is taken as today),
                 pp (the channel's priority, optional, 0), bo (bool: backorder when short;
                 one part of one located line, confirmed at once, undated),
                 parts:[{b, n, c (optional: candidates per line),
                   lines:[{sku, qty, loc | locs:[loc…] (routed, in the channel's order),
                           split (bool, routed only), pr ([ [channel, protected]… ] per candidate,
                           optional), cap (optional), bl (buyer limit, optional)}]}]}
Returns JSON:
  {"ok":1,"replay":0,"st":status,"cr":ms,"ex":ms,"rv":N}   accepted; when a line was routed
        also "lines": [ [sku, loc, qty] … ] (every line as taken, part by part)
  {"ok":1,"replay":1,"parts":[part…]}                the same request again: its parts
  {"ok":1,"replay":0,"st":"backordered","cr":ms,"ex":0,"rv":N}   short, and it asked to wait:
        it waits in the position's queue (fill_backorders in _lib fills it when supply comes)
  {"err":"insufficient","lines":[{sku,location,requested,available,limited_by,promise_day}]}
        limited_by: "stock", "protection" (other channels' protected units), "cap" or
        "backorders" (units backorders of this channel's priority or above wait for);
        promise_day: the earliest day the inbound schedule can give the line (a line with a
        location, not limited by its cap), absent when none can
Time-phased ATP: a reservation with a requested day is accepted when, at its day and every
later point of the position's schedule, on hand + inbound due by then - commitments due by
then - safety stock - other channels' protections >= 0 (phased_points in _lib); one without
a date is due now: the same check from the now point (the shelf) on, which is the plain
on_hand - committed - safety_stock - protections when nothing dated is committed.
  {"err":"buyer_limit","sku","limit","held","requested"}
  {"err":"customer_required","sku"}                  a buyer limit applies, no customer id
  {"err":"unknown_position","lines":[{sku,location}]}
  {"err":"rules_stale","have":N}                      a bucket enforces another rules version
  {"err":"conflict"}                                  same id, different request
  {"err":"bad_request","detail":…}
A refusal writes nothing, except that holds found already expired on the positions
touched are reclaimed first: that reclaim is due anyway and happens before deciding.
]]
--- @include "_lib"
--- @include "_reserve"

local ctx = reserve_ctx()
-- what the reservation wrote before a runtime error stays (as for any script): so do its
-- bucket totals, written by reserve_flush, before the error goes to the caller
local ok, reply = pcall(reserve_one, cjson.decode(ARGV[1]), cjson.decode(ARGV[2]), KEYS, ctx)
reserve_flush(ctx)
if not ok then error(reply, 0) end
return reply
