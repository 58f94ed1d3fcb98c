-- _lib.lua: helpers shared by every script. atp.scripts inlines this file where a script
-- says `--- @include "_lib"`, so each loaded script stays one self-contained EVALSHA body.
-- Conventions: every script returns one JSON string. {"ok":1,...} is success;
-- {"err":"<code>","detail":"..."} is an expected refusal decoded into a typed error.
-- A script validates everything before its first write (I7).

-- The globals every script uses, as locals (upvalues): a global is a table lookup each time.
local redis, string, table, math, cjson = redis, string, table, math, cjson
local tonumber, tostring, type, ipairs, pairs, next = tonumber, tostring, type, ipairs, pairs, next

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function refuse(code, detail, extra)
  local t = extra or {}
  t.err = code
  t.detail = detail
  return cjson.encode(t)
end

local function is_int(v, lo, hi)
  return type(v) == 'number' and v == math.floor(v) and v >= lo and v <= hi
end

local function is_text(v, maxlen)
  return type(v) == 'string' and #v > 0 and #v <= maxlen
end

local function opt_text(v, maxlen)
  return v == nil or (type(v) == 'string' and #v <= maxlen)
end

local function str(v)
  if v == nil or v == cjson.null then return '' end
  return tostring(v)
end

-- A position as a table, or nil when it does not exist.
-- `inbound`: open expected receipts (units); `dated`: the part of `committed` held by
-- reservations with a requested date (both kept with their schedule in the `sch` hash);
-- `bo`: units of backorders waiting in the position's queue (`bq`).
-- pos_of: that table from the values of an HMGET whose first fields are on_hand,
-- committed, safety_stock, inbound, dated, bo (in that order; nil when no on_hand).
local function pos_of(v)
  if not v[1] then return nil end
  return { on_hand = tonumber(v[1]), committed = tonumber(v[2] or '0'),
           safety_stock = tonumber(v[3] or '0'), inbound = tonumber(v[4] or '0'),
           dated = tonumber(v[5] or '0'), bo = tonumber(v[6] or '0') }
end

local function read_pos(key)
  return pos_of(redis.call('HMGET', key, 'on_hand', 'committed', 'safety_stock', 'inbound', 'dated', 'bo'))
end

-- The rules version a part's bucket enforces (set by rules_apply / rules_bump in the
-- bucket's stats hash, so a reserve reads it from a key it already has).
local function bucket_rules_version(stats_key)
  return tonumber(redis.call('HGET', stats_key, 'rv') or '0')
end

-- The whole position hash as the JSON-able reply shape. Fields named `<x>:…` other than
-- `ch:` (demand history `h:<day>`, and what other features keep there) are not figures of
-- the position: left out, whatever their prefix.
local function pos_reply(key)
  local flat = redis.call('HGETALL', key)
  local p = { on_hand = 0, committed = 0, safety_stock = 0, inbound = 0, dated = 0, bo = 0, ch = {} }
  for i = 1, #flat, 2 do
    local f, v = flat[i], tonumber(flat[i + 1])
    if string.sub(f, 1, 3) == 'ch:' then
      p.ch[string.sub(f, 4)] = v
    elseif p[f] ~= nil then
      p[f] = v
    end
  end
  return p
end

-- Append one movement (a change of on_hand or committed) to a position's log (I5).
-- The figures may be numbers or their text (reserve passes text it has at hand).
local function log_move(cfg, log_key, kind, m)
  redis.call('XADD', log_key, 'MAXLEN', '~', cfg.log_max, '*',
    'kind', kind, 'reason', str(m.reason), 'actor', str(cfg.actor), 'source', str(cfg.source),
    'ref', str(m.ref), 'rid', str(m.rid), 'channel', str(m.channel),
    'on_hand_before', m.ohb, 'on_hand_after', m.oha,
    'committed_before', m.cmb, 'committed_after', m.cma, 'at', m.at)
end

-- Append one event to a bucket's outbox stream; `data` is a table, or JSON text already.
local function emit(cfg, ev_key, etype, rid, channel, at, data)
  if type(data) ~= 'string' then data = cjson.encode(data) end
  redis.call('XADD', ev_key, 'MAXLEN', '~', cfg.ev_max, '*',
    'type', etype, 'rid', str(rid), 'channel', str(channel), 'at', at,
    'actor', str(cfg.actor), 'data', data)
end

-- Replenishment (atp.replenishment). Days are UTC days since the epoch: floor(ms / 86400000).
local DAY_MS = 86400000
local HISTORY_DAYS = 120

-- Keep a position's demand history to today and the HISTORY_DAYS complete days before it
-- (the longest window a plan reads). Called when a day's bucket is first written, so at
-- most once per position per day; bounded by the hash.
local function trim_history(pos_key, day)
  local names = redis.call('HKEYS', pos_key)
  for _, f in ipairs(names) do
    if string.sub(f, 1, 2) == 'h:' then
      local d = tonumber(string.sub(f, 3))
      if d == nil or d < day - HISTORY_DAYS then redis.call('HDEL', pos_key, f) end
    end
  end
end

-- The replenishment signal of one position, re-evaluated after a script changed its
-- on_hand, committed, inbound or backorders: inventory position = on_hand + inbound -
-- committed - backordered (units backorders wait for: demand not yet committed).
-- At or below the reorder point (`rop`) a signal is raised once (`rs` = 1, an entry in
-- the bucket's open-signal hash `rp_key`, a `replenishment` event on the outbox) and not
-- again until the position rises above the reorder point, which clears it (a
-- `replenishment_cleared` event). A position without a reorder point costs one HMGET.
-- Returns 'raised', 'cleared' or nil.
-- replen_apply decides from the figures given (a caller that has just read and written
-- them, as reserve does); replen_check reads them first.
local function replen_apply(cfg, pos_key, rp_key, ev_key, sku, loc, now, rop, out, open, oh, cm, inb, bo)
  -- backorders are demand not yet committed: they lower the inventory position too
  local ip = oh + inb - cm - bo
  local member = sku .. '|' .. loc
  if ip <= rop then
    if open then return nil end
    local d = { sku = sku, location = loc, on_hand = oh, inbound = inb, committed = cm,
      backordered = bo, inventory_position = ip, reorder_point = rop, order_up_to = out,
      suggested_qty = out - ip, raised_at = now }
    redis.call('HSET', pos_key, 'rs', 1)
    redis.call('HSET', rp_key, member, cjson.encode(d))
    emit(cfg, ev_key, 'replenishment', '', '', now, d)
    return 'raised'
  elseif open then
    redis.call('HDEL', pos_key, 'rs')
    redis.call('HDEL', rp_key, member)
    emit(cfg, ev_key, 'replenishment_cleared', '', '', now, { sku = sku, location = loc,
      on_hand = oh, inbound = inb, committed = cm, backordered = bo, inventory_position = ip,
      reorder_point = rop })
    return 'cleared'
  end
  return nil
end

local function replen_check(cfg, pos_key, rp_key, ev_key, sku, loc, now)
  local v = redis.call('HMGET', pos_key, 'rop', 'on_hand', 'committed', 'inbound', 'out', 'rs', 'bo')
  if not v[1] then return nil end
  local rop = tonumber(v[1])
  return replen_apply(cfg, pos_key, rp_key, ev_key, sku, loc, now, rop, tonumber(v[5] or v[1]),
    v[6] == '1', tonumber(v[2] or '0'), tonumber(v[3] or '0'), tonumber(v[4] or '0'),
    tonumber(v[7] or '0'))
end

-- Units a reservation line still holds committed: not shipped and not released. Units
-- reported short stay open (the order still wants them) until shipped or released.
local function line_open(l)
  return l.qty - l.shipped - l.released
end

-- The member of a reservation line in its position's live index (`lx`, a zset whose
-- members all score 0 and sort by text): channel, held (0) before confirmed (1), newest
-- first, id. The shortage rule walks it per channel in that order (at_risk).
local function lx_member(part)
  local flag = '1'
  if part.st == 'held' or part.st == 'expired' then flag = '0' end
  return part.ch .. ':' .. flag .. ':' .. string.format('%013d', 9999999999999 - part.cr) .. ':' .. part.id
end

-- Add `qty` to what a reservation holds committed on one line's position: the position,
-- its channel, and the SKU's totals per channel and per customer (caps, buyer limits).
-- A dated reservation (`part.rd`, its requested day) also keeps the position's dated
-- schedule: `dated` in the position and field `-<day>` in `sch` (time-phased ATP).
-- A positive commitment (reserve: held or confirmed, made at `part.cr`) is also the
-- position's demand of that day, `h:<day>` (gross: a later release does not take it back).
-- What a commitment changes beside its position hash: the dated schedule's day (`rd`)
-- and the SKU's totals per channel (`ch_field`) and per customer (`cu`), each field
-- dropped when it comes back to zero.
local function commit_beside(lk, ch_field, cu, rd, qty)
  if rd then
    local f = string.format('-%d', rd)
    if redis.call('HINCRBY', lk.sch, f, qty) <= 0 then redis.call('HDEL', lk.sch, f) end
  end
  if redis.call('HINCRBY', lk.agg, ch_field, qty) == 0 then redis.call('HDEL', lk.agg, ch_field) end
  if cu and cu ~= '' then
    local f = 'cu:' .. cu
    if redis.call('HINCRBY', lk.agg, f, qty) <= 0 then redis.call('HDEL', lk.agg, f) end
  end
end

local function commit_units(lk, part, qty)
  if qty > 0 and part.cr then
    local day = math.floor(part.cr / DAY_MS)
    if redis.call('HINCRBY', lk.pos, 'h:' .. string.format('%d', day), qty) == qty then
      trim_history(lk.pos, day)
    end
  end
  local after = redis.call('HINCRBY', lk.pos, 'committed', qty)
  redis.call('HINCRBY', lk.pos, 'ch:' .. part.ch, qty)
  if part.rd then redis.call('HINCRBY', lk.pos, 'dated', qty) end
  commit_beside(lk, 'ch:' .. part.ch, part.cu, part.rd, qty)
  return after
end

-- Take `qty` units of a line back out of committed (release, expiry, remainder).
local function uncommit(cfg, lk, part, qty, kind, reason, now)
  local after = commit_units(lk, part, -qty)
  local oh = tonumber(redis.call('HGET', lk.pos, 'on_hand') or '0')
  log_move(cfg, lk.log, kind, { reason = reason, rid = part.id, channel = part.ch,
    ohb = oh, oha = oh, cmb = after + qty, cma = after, at = now })
end

-- Keep the bucket's unit totals (committed, and held: units of parts still on hold).
local function stat(stats_key, committed, held)
  if committed ~= 0 then redis.call('HINCRBY', stats_key, 'committed', committed) end
  if held ~= 0 then redis.call('HINCRBY', stats_key, 'held', held) end
end

-- Time-phased ATP (issue 7). Days are UTC days since 1970-01-01 (`today_of(now)`).
local function today_of(now)
  return math.floor(now / 86400000)
end

-- The position's schedule as points in time, for the phased check:
--   the now point (the shelf): slack = on_hand - undated committed;
--   one point per day (>= today) on which inbound is due or dated commitments fall due,
--   slack = on_hand + inbound due by that day - undated committed - dated due by that day.
-- Days before today fold into today (an overdue receipt is still expected; an overdue
-- promise is still owed). Safety stock and protections are not in the slack: callers
-- subtract them. Returns the now slack and the day points in order ({day, slack}).
-- The schedule hash `sch` has one field per day and kind, named by the day number alone so
-- the walk parses no text: `<day>` units of inbound due that day, `-<day>` units promised
-- to reservations for that day.
-- `less` (optional): units to leave out of the promised ones per day (explain: lapsed
-- holds reserve reclaims).
local function phased_points(sch_key, p, today, less)
  local base = p.on_hand - (p.committed - p.dated)
  if p.inbound == 0 and p.dated == 0 then return base, {} end
  local flat = redis.call('HGETALL', sch_key)
  local delta, days, nd = {}, {}, 0
  for i = 1, #flat, 2 do
    local day, v = tonumber(flat[i]), tonumber(flat[i + 1])
    if day and v then
      local dated = day < 0
      if dated then
        day = -day
        if less then v = v - (less[day] or 0) end
      end
      if day < today then day = today end
      local cur = delta[day]
      if cur == nil then
        nd = nd + 1
        days[nd] = day
        cur = 0
      end
      if dated then delta[day] = cur - v else delta[day] = cur + v end
    end
  end
  table.sort(days)
  local pts, slack = {}, base
  for i = 1, nd do
    local day = days[i]
    slack = slack + delta[day]
    pts[i] = { day, slack }
  end
  return base, pts
end

-- The least slack over every point a reservation due on `from_day` must not break: the
-- point of its own day (everything due by then) and every later one. `from_day` nil: due
-- now (an undated reservation), the now point and every day.
local function phased_min(base, pts, from_day)
  local m = base
  if from_day ~= nil then
    for _, pt in ipairs(pts) do
      if pt[1] <= from_day then m = pt[2] else break end
    end
  end
  for _, pt in ipairs(pts) do
    if (from_day == nil or pt[1] > from_day) and pt[2] < m then m = pt[2] end
  end
  return m
end

-- The earliest day (>= today) on which `need` units (qty + safety stock + protections) can
-- be promised, or nil when no day of the known schedule can.
local function promise_day(base, pts, today, need)
  if phased_min(base, pts, today) >= need then return today end
  for _, pt in ipairs(pts) do
    if pt[1] > today and phased_min(base, pts, pt[1]) >= need then return pt[1] end
  end
  return nil
end

-- The least slack of a position over all its points: committed <= on_hand - safety_stock
-- at every point is I1 in its time-phased form (DESIGN.md: future-dated promises may
-- count inbound due by their date). Without dated commitments it is on_hand - committed.
-- The slack a reservation due on `from_day` (nil: now) may draw on, against `need` (its
-- qty plus what is held back for others). The schedule is walked only when the shelf alone
-- does not settle it: at every point supply >= on_hand and commitments <= committed, so
-- the phased slack is never below on_hand - committed, and when that covers `need` the
-- walk cannot change the answer. Returns the slack (exact whenever it is short of `need`),
-- and the schedule's points when they were read.
local function slack_for(sch_key, p, today, from_day, need)
  local slack = p.on_hand - p.committed
  if (from_day == nil and p.dated == 0) or slack >= need then return slack end
  local base, pts = phased_points(sch_key, p, today)
  return phased_min(base, pts, from_day), base, pts
end

-- Also returns the point where it is least: -1 for the now point (only undated
-- commitments are due there), else its day (commitments due by then are). With `need`,
-- a shelf that covers it settles the answer without reading the schedule (slack_for).
local function position_slack(lk, p, now, need)
  if p.dated == 0 or not lk.sch then return p.on_hand - p.committed, -1 end
  if need and p.on_hand - p.committed >= need then return p.on_hand - p.committed, -1 end
  local base, pts = phased_points(lk.sch, p, today_of(now))
  local least, at = base, -1
  for _, pt in ipairs(pts) do
    if pt[2] < least then least, at = pt[2], pt[1] end
  end
  return least, at
end

-- The shortage rule (I6), the one place that decides who loses when a position can no
-- longer cover its commitments: lowest channel priority first; within a channel, holds
-- before confirmed reservations (a cart before a paid order), newest first. Walks the
-- position's live index `lx` channel by channel until the open units chosen cover the
-- shortfall, naming at most `limit` reservations. `prio` maps channel -> priority
-- (a channel the rules do not name has priority 0). `due_by`: the point that is short
-- (position_slack): -1, the now point, where only undated reservations are due; a day,
-- where those dated on or before it are too. A reservation not due there is passed over:
-- releasing it would not cover that point. Returns the list and its units.
local function at_risk(lk, res_key, sku, loc, shortfall, prio, limit, now, due_by)
  local today = today_of(now)
  local flat = redis.call('HGETALL', lk.pos)
  local chans = {}
  for i = 1, #flat, 2 do
    if string.sub(flat[i], 1, 3) == 'ch:' and tonumber(flat[i + 1]) > 0 then
      chans[#chans + 1] = string.sub(flat[i], 4)
    end
  end
  prio = prio or {}
  table.sort(chans, function(a, b)
    local pa, pb = tonumber(prio[a]) or 0, tonumber(prio[b]) or 0
    if pa ~= pb then return pa < pb end
    return a < b
  end)
  local out, units = {}, 0
  for _, ch in ipairs(chans) do
    local start = 0
    while units < shortfall and #out < limit do
      local page = redis.call('ZRANGEBYLEX', lk.lx, '[' .. ch .. ':', '(' .. ch .. ';', 'LIMIT', start, 64)
      if #page == 0 then break end
      for _, member in ipairs(page) do
        local rid = string.match(member, '^[^:]*:[^:]*:[^:]*:(.*)$')
        local raw = rid and redis.call('HGET', res_key, rid)
        local part = raw and cjson.decode(raw)
        if part and part.rd and due_by ~= nil and (due_by < 0 or math.max(part.rd, today) > due_by) then
          part = nil  -- not due at the point that is short
        end
        if part then
          for _, l in ipairs(part.lines) do
            local open = line_open(l)
            if l.sku == sku and l.loc == loc and open > 0 then
              local st = part.st
              if st == 'held' and part.ex > 0 and part.ex <= now then st = 'expired' end
              out[#out + 1] = { reservation_id = rid, channel = ch, priority = tonumber(prio[ch]) or 0,
                                status = st, qty = open, created_at = part.cr }
              units = units + open
            end
          end
        end
        if units >= shortfall or #out >= limit then break end
      end
      start = start + #page
    end
    if units >= shortfall or #out >= limit then break end
  end
  return out, units
end

-- The oversell exception's data when a position no longer covers its commitments (I1),
-- naming the reservations the shortage rule puts at risk (when given the live index);
-- nil when it is covered. check_cover raises it on the outbox.
local function uncovered(cfg, lk, res_key, sku, loc, cause, now, prio)
  local p = read_pos(lk.pos)
  local slack, due_by = nil, -1
  if p then slack, due_by = position_slack(lk, p, now, p.safety_stock) end
  if p and slack < p.safety_stock then
    local shortfall = p.safety_stock - slack
    local ex = { kind = 'oversell', cause = cause, sku = sku, location = loc,
      on_hand = p.on_hand, committed = p.committed, safety_stock = p.safety_stock,
      shortfall = shortfall }
    if lk.lx and res_key then
      local limit = tonumber(cfg.risk_max) or 500
      local list, units = at_risk(lk, res_key, sku, loc, shortfall, prio, limit, now, due_by)
      if due_by >= 0 then ex.short_on = due_by end  -- the day that is short (time-phased)
      ex.at_risk = list
      ex.units_at_risk = units
      ex.truncated = (units < shortfall and #list >= limit)
    end
    if #(ex.at_risk or {}) == 0 then ex.at_risk = nil end
    return ex
  end
  return nil
end

-- Raise an exception for order management: an `exception` event on the bucket's outbox
-- and a record in its exceptions hash (`bk.exc`), open until an operator resolves it
-- (lua/resolve.lua). Its id is "<bucket>-<n>", n counting the bucket's exceptions.
local function raise_exception(cfg, bk, b, rid, channel, now, data)
  local n = redis.call('HINCRBY', bk.stats, 'xseq', 1)
  data.id = string.format('%d-%d', b, n)
  data.status = 'open'
  data.raised_at = now
  if rid ~= '' then data.reservation_id = rid end
  redis.call('HSET', bk.exc, data.id, cjson.encode(data))
  emit(cfg, bk.events, 'exception', rid, channel, now, data)
  return data.id
end

-- Raise an oversell exception when a position no longer covers its commitments.
-- `bk` holds the bucket's res, events, stats and exc keys; `b` its number.
local function check_cover(cfg, lk, bk, b, sku, loc, cause, rid, now, prio)
  local ex = uncovered(cfg, lk, bk.res, sku, loc, cause, now, prio)
  if ex then raise_exception(cfg, bk, b, rid, '', now, ex) end
  return ex
end

-- Reclaim, on one position, the units of holds that have expired (bounded by `limit`).
-- The expired reservations' parts live in `e.res` (same bucket as the position).
-- Returns the units given back and how many lapsed holds it looked at (below `limit`:
-- none is left lapsed at `now`).
local function reclaim_expired(cfg, lk, e, sku, loc, now, limit)
  local ids = redis.call('ZRANGEBYSCORE', lk.hx, '-inf', now, 'LIMIT', 0, limit)
  local n = 0
  for _, rid in ipairs(ids) do
    local raw = redis.call('HGET', e.res, rid)
    if raw then
      local part = cjson.decode(raw)
      if part.st == 'expired' or (part.st == 'held' and part.ex > 0 and part.ex <= now) then
        local live = 0
        for _, l in ipairs(part.lines) do
          local open = line_open(l)
          if l.sku == sku and l.loc == loc and open > 0 then
            uncommit(cfg, lk, part, open, 'expire', 'hold expired', now)
            redis.call('ZREM', lk.lx, lx_member(part))
            stat(e.stats, -open, -open)
            l.released = l.released + open
            n = n + open
          elseif open > 0 then
            live = live + 1
          end
        end
        if part.st ~= 'expired' then
          part.st = 'expired'
          emit(cfg, e.events, 'expired', part.id, part.ch, now, { expires_at = part.ex })
        end
        part.up = now
        if live == 0 then redis.call('ZREM', e.holds, rid) end
        redis.call('HSET', e.res, rid, cjson.encode(part))
      end
    end
    redis.call('ZREM', lk.hx, rid)
  end
  return n, #ids
end

-- What reclaim_expired would give back on one position, without writing: units per
-- channel, per customer and per requested day of dated holds (explain and availability
-- show ATP as the next reserve sees it).
local function reclaimable(lk, res_key, sku, loc, now, limit)
  local ids = redis.call('ZRANGEBYSCORE', lk.hx, '-inf', now, 'LIMIT', 0, limit)
  local total, by_ch, by_cu, by_rd = 0, {}, {}, {}
  for _, rid in ipairs(ids) do
    local raw = redis.call('HGET', res_key, rid)
    if raw then
      local part = cjson.decode(raw)
      if part.st == 'expired' or (part.st == 'held' and part.ex > 0 and part.ex <= now) then
        for _, l in ipairs(part.lines) do
          local open = line_open(l)
          if l.sku == sku and l.loc == loc and open > 0 then
            total = total + open
            by_ch[part.ch] = (by_ch[part.ch] or 0) + open
            if part.cu and part.cu ~= '' then by_cu[part.cu] = (by_cu[part.cu] or 0) + open end
            if part.rd then by_rd[part.rd] = (by_rd[part.rd] or 0) + open end
          end
        end
      end
    end
  end
  return total, by_ch, by_cu, by_rd
end

-- ATP of one position for channel `ch` (DESIGN.md, I6):
--   on_hand - committed - safety_stock - sum over other channels g of max(0, protected_g - committed_g)
-- `pr` lists {g, protected} for the SKU at this location; `chc(g)` gives g's committed here.
-- Returns the position's ATP (may be negative) and the units protected for others.
local function channel_atp(p, ch, pr, chc)
  local prot = 0
  if pr then
    for _, gp in ipairs(pr) do
      local g, q = gp[1], gp[2]
      if g ~= ch then
        local left = q - chc(g)
        if left > 0 then prot = prot + left end
      end
    end
  end
  return p.on_hand - p.committed - p.safety_stock - prot, prot
end

-- Backorders (issue 7). A reservation that asked to wait rather than be refused
-- (`on_short: backorder`; one line, at a location, confirmed, undated) waits in its
-- position's queue `bq`: a zset of "<qty>:<id>" scored by channel priority (higher first),
-- then arrival (the position's counter `bqseq`). The position keeps `bo` (units waiting)
-- and `bp:<priority>` (units waiting per priority). A part waiting is `backordered`: it
-- holds no committed units; `part.bq` = {priority, seq}, and it keeps the protections,
-- cap and buyer limit it was accepted under (`pr`, `cap`, `bl`) to be filled by them.
local BO_PRIO_MAX = 1000000
local BO_SEQ = 4294967296

local function bo_score(prio, seq)
  return (BO_PRIO_MAX - prio) * BO_SEQ + seq
end

local function bo_member(part)
  return string.format('%d', part.lines[1].qty) .. ':' .. part.id
end

-- Units waiting at priority `prio` or above: a new reservation of that priority comes
-- after them, so it may not take what they wait for. Reads nothing when nothing waits.
local function waiting_ahead(pos_key, p, prio)
  if p.bo <= 0 then return 0 end
  local flat = redis.call('HGETALL', pos_key)
  local n = 0
  for i = 1, #flat, 2 do
    if string.sub(flat[i], 1, 3) == 'bp:' and tonumber(string.sub(flat[i], 4)) >= prio then
      n = n + tonumber(flat[i + 1])
    end
  end
  return n
end

local function bo_enqueue(lk, part)
  local qty = part.lines[1].qty
  local seq = redis.call('HINCRBY', lk.pos, 'bqseq', 1)
  part.bq = { part.bq[1], seq }
  redis.call('ZADD', lk.bq, bo_score(part.bq[1], seq), bo_member(part))
  redis.call('HINCRBY', lk.pos, 'bo', qty)
  redis.call('HINCRBY', lk.pos, 'bp:' .. part.bq[1], qty)
end

local function bo_dequeue(lk, part)
  local qty = part.lines[1].qty
  redis.call('ZREM', lk.bq, bo_member(part))
  redis.call('HINCRBY', lk.pos, 'bo', -qty)
  if redis.call('HINCRBY', lk.pos, 'bp:' .. part.bq[1], -qty) <= 0 then
    redis.call('HDEL', lk.pos, 'bp:' .. part.bq[1])
  end
end

-- Fill the position's backorders in queue order with what it can now give, each at once a
-- confirmed reservation (a `backorder_filled` event and movement). Stops at the first one
-- the position cannot cover (no later one may take what an earlier one waits for); one
-- whose own channel cap or buyer limit no longer lets it have the units waits on without
-- holding up the others. One stamped with a rules version its bucket no longer enforces
-- stops the fill until it is re-stamped (lua/bo_restamp.lua): none is filled by rules
-- no longer in force. At most cfg.fill_max (1000) backorders are looked at per call;
-- the next supply event goes on. `lk` needs pos, log, lx, sch, bq and agg; `e` res,
-- events, stats. Returns the ids filled.
local function fill_backorders(cfg, lk, e, now)
  local filled = {}
  if not lk.bq then return filled end
  local budget = tonumber(cfg.fill_max) or 1000
  local today = today_of(now)
  local rv = bucket_rules_version(e.stats)
  local start, short = 0, false
  while not short and budget > 0 do
    local page = redis.call('ZRANGE', lk.bq, start, start + math.min(budget, 100) - 1)
    if #page == 0 then break end
    for _, member in ipairs(page) do
      budget = budget - 1
      local rid = string.match(member, '^%d+:(.*)$')
      local raw = rid and redis.call('HGET', e.res, rid)
      local part = raw and cjson.decode(raw)
      if not part or part.st ~= 'backordered' then
        redis.call('ZREM', lk.bq, member)  -- nothing waits under it any more
      elseif (part.rv or 0) ~= rv then
        -- stamped with rules no longer in force: it waits, and so do those behind it,
        -- until the core re-stamps it (lua/bo_restamp.lua, ATP.restamp_backorders)
        short = true
        break
      else
        local qty = part.lines[1].qty
        local p = read_pos(lk.pos)
        local _, prot = channel_atp(p, part.ch, part.pr, function(g)
          return tonumber(redis.call('HGET', lk.pos, 'ch:' .. g) or '0')
        end)
        local slack = slack_for(lk.sch, p, today, nil, qty + p.safety_stock + prot)
        if slack - p.safety_stock - prot < qty then short = true; break end
        local allowed = true
        if part.cap ~= nil and tonumber(redis.call('HGET', lk.agg, 'ch:' .. part.ch) or '0') + qty > part.cap then
          allowed = false
        end
        if part.bl ~= nil and part.cu and tonumber(redis.call('HGET', lk.agg, 'cu:' .. part.cu) or '0') + qty > part.bl then
          allowed = false
        end
        if allowed then
          bo_dequeue(lk, part)
          part.st = 'confirmed'
          part.up = now
          part.fl = now
          local after = commit_units(lk, part, qty)
          log_move(cfg, lk.log, 'reserve', { reason = 'backorder_filled', rid = rid, channel = part.ch,
            ohb = p.on_hand, oha = p.on_hand, cmb = after - qty, cma = after, at = now })
          redis.call('ZADD', lk.lx, 0, lx_member(part))
          stat(e.stats, qty, 0)
          local js = cjson.encode(part)
          redis.call('HSET', e.res, rid, js)
          emit(cfg, e.events, 'backorder_filled', rid, part.ch, now, js)
          filled[#filled + 1] = rid
        else
          start = start + 1  -- it stays in the queue; the next page starts after it
        end
      end
      if budget <= 0 then break end
    end
  end
  return filled
end


-- Walk KEYS for a reservation call: optional index key, then per part six bucket keys
-- (res, holds, events, stats, exc, rp) followed, per line, by the SKU's totals key (agg) and
-- six keys per candidate position (pos, hx, log, lx, sch, bq). A line has one candidate unless reserve
-- routes it: `p.c` then lists the candidate count of each line. Returns the index key (or false) and the
-- parts' key tables (line li's first candidate at e.lines[li], all at e.cands[li]), or nil
-- and a refusal when KEYS does not match the request. `keys` (optional) walks that table
-- instead of KEYS (reserve_many: one reservation's slice of its KEYS).
local function part_keys(with_index, parts, keys)
  local KEYS = keys or KEYS
  local k = 1
  local idx = false
  if with_index then idx = KEYS[1]; k = 2 end
  local out = {}
  for pi, p in ipairs(parts) do
    local e = { res = KEYS[k], holds = KEYS[k + 1], events = KEYS[k + 2], stats = KEYS[k + 3],
                exc = KEYS[k + 4], rp = KEYS[k + 5],
                lines = {}, cands = {} }
    k = k + 6
    for li = 1, p.n do
      local agg = KEYS[k]
      k = k + 1
      local nc = 1
      if type(p.c) == 'table' then nc = tonumber(p.c[li]) or 0 end
      if nc < 1 or nc > 64 then return nil, refuse('bad_request', 'a line has 1 to 64 candidate locations') end
      local cs = {}
      for ci = 1, nc do
        cs[ci] = { pos = KEYS[k], hx = KEYS[k + 1], log = KEYS[k + 2], lx = KEYS[k + 3],
                   sch = KEYS[k + 4], bq = KEYS[k + 5], agg = agg }
        k = k + 6
      end
      e.lines[li] = cs[1]
      e.cands[li] = cs
    end
    out[pi] = e
  end
  if k - 1 ~= #KEYS then return nil, refuse('bad_request', 'KEYS do not match the parts') end
  return idx, out
end

-- Load every part of a reservation; nil and a refusal when one is missing or malformed.
local function load_parts(id, pk, parts)
  local recs = {}
  for pi, e in ipairs(pk) do
    local raw = redis.call('HGET', e.res, id)
    if not raw then
      return nil, refuse('unknown_reservation', 'no reservation with id ' .. id)
    end
    local rec = cjson.decode(raw)
    if #rec.lines ~= parts[pi].n then
      return nil, refuse('bad_request', 'line keys do not match reservation ' .. id)
    end
    recs[pi] = rec
  end
  return recs
end

-- The reservation's state as the callers see it: any expired part, or a lapsed hold,
-- makes the whole reservation expired.
local function logical_status(recs, now)
  local st = recs[1].st
  for _, r in ipairs(recs) do
    if r.st == 'expired' then return 'expired' end
    if r.st == 'held' and r.ex > 0 and r.ex <= now then return 'expired' end
    if r.st ~= st then st = r.st end
  end
  return st
end

local function validate_parts_shape(req, max_parts)
  if type(req.parts) ~= 'table' or #req.parts == 0 or #req.parts > max_parts then
    return 'parts must be a non-empty list'
  end
  for _, p in ipairs(req.parts) do
    if not is_int(p.n, 1, 10000) then return 'each part needs a line count' end
    if not is_int(p.b, 0, 16383) then return 'each part needs its bucket number' end
  end
  return nil
end
