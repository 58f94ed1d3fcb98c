-- _lib.lua: helpers shared by every script. atp.scripts inlines this file where a script
-- says `--- @include "_lib"`, so each loaded script stays one self-contained EVALSHA body.
-- Conventions: every script returns one JSON string. {"ok":1,...} is success;
-- {"err":"<code>","detail":"..."} is an expected refusal decoded into a typed error.
-- A script validates everything before its first write (I7).

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
local function read_pos(key)
  local v = redis.call('HMGET', key, 'on_hand', 'committed', 'safety_stock')
  if not v[1] then return nil end
  return { on_hand = tonumber(v[1]), committed = tonumber(v[2] or '0'),
           safety_stock = tonumber(v[3] or '0') }
end

-- The whole position hash as the JSON-able reply shape.
local function pos_reply(key)
  local flat = redis.call('HGETALL', key)
  local p = { on_hand = 0, committed = 0, safety_stock = 0, ch = {} }
  for i = 1, #flat, 2 do
    local f, v = flat[i], tonumber(flat[i + 1])
    if string.sub(f, 1, 3) == 'ch:' then
      p.ch[string.sub(f, 4)] = v
    else
      p[f] = v
    end
  end
  return p
end

-- Append one movement (a change of on_hand or committed) to a position's log (I5).
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

-- Units a reservation line still holds committed: not shipped and not released. Units
-- reported short stay open (the order still wants them) until shipped or released.
local function line_open(l)
  return l.qty - l.shipped - l.released
end

-- Take `qty` units of a line back out of committed (release, expiry, remainder).
local function uncommit(cfg, pos_key, log_key, part, qty, kind, reason, now)
  local after = redis.call('HINCRBY', pos_key, 'committed', -qty)
  redis.call('HINCRBY', pos_key, 'ch:' .. part.ch, -qty)
  local oh = tonumber(redis.call('HGET', pos_key, 'on_hand') or '0')
  log_move(cfg, log_key, kind, { reason = reason, rid = part.id, channel = part.ch,
    ohb = oh, oha = oh, cmb = after + qty, cma = after, at = now })
end

-- Keep the bucket's unit totals (committed, and held: units of parts still on hold).
local function stat(stats_key, committed, held)
  if committed ~= 0 then redis.call('HINCRBY', stats_key, 'committed', committed) end
  if held ~= 0 then redis.call('HINCRBY', stats_key, 'held', held) end
end

-- Raise an oversell exception when a position no longer covers its commitments (I1).
local function check_cover(cfg, pos_key, ev_key, sku, loc, cause, rid, now)
  local p = read_pos(pos_key)
  if p and p.committed > p.on_hand - p.safety_stock then
    emit(cfg, ev_key, 'exception', rid, '', now, { kind = 'oversell', cause = cause,
      sku = sku, location = loc, on_hand = p.on_hand, committed = p.committed,
      safety_stock = p.safety_stock,
      shortfall = p.committed - (p.on_hand - p.safety_stock) })
  end
end

-- Reclaim, on one position, the units of holds that have expired (bounded by `limit`).
-- The expired reservations' parts live in `res_key` (same bucket as the position).
local function reclaim_expired(cfg, pos_key, hx_key, log_key, res_key, holds_key, ev_key,
                               stats_key, sku, loc, now, limit)
  local ids = redis.call('ZRANGEBYSCORE', hx_key, '-inf', now, 'LIMIT', 0, limit)
  local n = 0
  for _, rid in ipairs(ids) do
    local raw = redis.call('HGET', res_key, rid)
    if raw then
      local part = cjson.decode(raw)
      if part.st == 'expired' or (part.st == 'held' and part.ex > 0 and part.ex <= now) then
        local live = 0
        for _, l in ipairs(part.lines) do
          local open = line_open(l)
          if l.sku == sku and l.loc == loc and open > 0 then
            uncommit(cfg, pos_key, log_key, part, open, 'expire', 'hold expired', now)
            stat(stats_key, -open, -open)
            l.released = l.released + open
            n = n + open
          elseif open > 0 then
            live = live + 1
          end
        end
        if part.st ~= 'expired' then
          part.st = 'expired'
          emit(cfg, ev_key, 'expired', part.id, part.ch, now, { expires_at = part.ex })
        end
        part.up = now
        if live == 0 then redis.call('ZREM', holds_key, rid) end
        redis.call('HSET', res_key, rid, cjson.encode(part))
      end
    end
    redis.call('ZREM', hx_key, rid)
  end
  return n
end

-- Walk KEYS for a reservation call: optional index key, then per part four bucket keys
-- (res, holds, events, stats) followed by three keys per line (pos, hx, log). Returns the index key (or false) and the parts'
-- key tables, or nil and a refusal when KEYS does not match the request.
local function part_keys(with_index, parts)
  local k = 1
  local idx = false
  if with_index then idx = KEYS[1]; k = 2 end
  local out = {}
  for pi, p in ipairs(parts) do
    local e = { res = KEYS[k], holds = KEYS[k + 1], events = KEYS[k + 2], stats = KEYS[k + 3], lines = {} }
    k = k + 4
    for li = 1, p.n do
      e.lines[li] = { pos = KEYS[k], hx = KEYS[k + 1], log = KEYS[k + 2] }
      k = k + 3
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
  end
  return nil
end
