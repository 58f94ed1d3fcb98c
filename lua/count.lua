--[[ count: apply cycle-count rows from the system of record, each as of the time it was
counted (DESIGN.md, reconciliation). For one row of a position:

  on_hand at the count's time  = on_hand_before of the first movement logged after it
                                 (the log chains, I5), or the current on_hand if none,
                                 plus the drift of counts taken before it but applied
                                 after it (a correction of an earlier moment, not a
                                 movement after the count: without it that drift would
                                 be counted twice)
  drift                        = counted - on_hand at the count's time
  new on_hand                  = current on_hand + drift
                                 (= counted + every on-hand movement after the count)

so shipments, receipts and adjustments applied after the count was taken are carried
over. Each applied row writes a `count` movement (reason cycle_count, the count id as ref,
before, after, drift, counted, counted_at) and, when it moved on_hand, a `counted` event;
when the position no longer covers its commitments, an oversell exception names the
reservations the shortage rule puts at risk (at_risk in _lib.lua).

A row is refused, with its reason, and changes nothing when: the position does not exist;
the count is from the future beyond cfg.skew; movements after the count's time were
trimmed from the log (older than its retention: never guessed); a count of the same or a
later time was already applied to the position, or on_hand was set absolutely after the
count's time (set_position: a statement of the whole figure, not a movement to carry
over); the same count id already counted the
position on another row (a duplicate); or the result would be negative or above the
maximum. A row this count id already applied (a worker retrying a batch after a crash)
is reported `already` with its original figures and not applied twice: each position
keeps its last few applied counts in field `cc` (with when each was applied, `ap`, and
its ordinal `n`); when more counts were applied after the row's time than it keeps, the
row is refused as before_retention too.

KEYS: per group (one bucket): events | res | stats | exc | rp, then per row: pos | log | lx |
      sch | agg | bq (a count that raises on hand fills the position's backorders)
ARGV:
  [1] cfg  JSON {max_on_hand, log_max, ev_max, actor, source, skew (ms), risk_max}
  [2] req  JSON {cid (count id), dry (bool: decide, write nothing), prio ({channel:
                 priority}, optional), groups:[{b, rows:[{sku, loc, q, t (ms), row}]}]}
Returns JSON:
  {"ok":1,"now":ms,"rows":[{row, st: "applied"|"already"|"dry"|"refused", reason (refused),
     detail, before, after, drift, at_t (on_hand at the count's time), committed,
     safety_stock, exception (id), at_risk (units)}]}
  {"err":"bad_request"}
]]
--- @include "_lib"

local cfg = cjson.decode(ARGV[1])
local req = cjson.decode(ARGV[2])
if not is_text(req.cid, 128) then return refuse('bad_request', 'count id must be 1-128 characters') end
if req.prio ~= nil and type(req.prio) ~= 'table' then return refuse('bad_request', 'prio must be a map of channel priorities') end
if type(req.groups) ~= 'table' then return refuse('bad_request', 'groups must be a list') end
local want = 0
for _, g in ipairs(req.groups) do
  if not is_int(g.b, 0, 16383) or type(g.rows) ~= 'table' then return refuse('bad_request', 'each group needs b and rows') end
  want = want + 5 + 6 * #g.rows
end
if want ~= #KEYS then return refuse('bad_request', 'KEYS do not match the rows') end

local CC_KEEP = 4
local now = now_ms()
local out = {}

-- the on_hand a position had at time t (ms), from its movement log; nil and a reason when
-- the log no longer reaches back that far
local function on_hand_at(log_key, t, current)
  local after = redis.call('XRANGE', log_key, string.format('%d', t + 1), '+', 'COUNT', 1)
  if #after == 0 then return current end
  local oldest = redis.call('XRANGE', log_key, '-', '+', 'COUNT', 1)
  local oldest_ms = tonumber(string.match(oldest[1][1], '^(%d+)'))
  if oldest_ms > t then
    -- every movement after t is still there only if the log was never trimmed
    local info = redis.call('XINFO', 'STREAM', log_key)
    local len, added = 0, 0
    for i = 1, #info, 2 do
      if info[i] == 'length' then len = tonumber(info[i + 1]) end
      if info[i] == 'entries-added' then added = tonumber(info[i + 1]) end
    end
    if added > len then return nil end
  end
  local f = after[1][2]
  for i = 1, #f, 2 do
    if f[i] == 'on_hand_before' then return tonumber(f[i + 1]) end
  end
  return nil
end

local k = 1
for _, g in ipairs(req.groups) do
  local bk = { events = KEYS[k], res = KEYS[k + 1], stats = KEYS[k + 2], exc = KEYS[k + 3], rp = KEYS[k + 4] }
  k = k + 5
  for _, r in ipairs(g.rows) do
    local lk = { pos = KEYS[k], log = KEYS[k + 1], lx = KEYS[k + 2], sch = KEYS[k + 3],
                 agg = KEYS[k + 4], bq = KEYS[k + 5] }
    k = k + 6
    local res = { row = r.row }
    out[#out + 1] = res
    local function no(reason, detail)
      res.st = 'refused'
      res.reason = reason
      res.detail = detail
    end
    if not is_int(r.row, 0, 1e15) then
      no('bad_row', 'row must be a row number')
    elseif not is_text(r.sku, 64) or not is_text(r.loc, 64) then
      no('bad_row', 'sku and location are required')
    elseif not is_int(r.q, 0, cfg.max_on_hand) then
      no('bad_count', 'counted quantity must be a whole number from 0 to ' .. cfg.max_on_hand)
    elseif not is_int(r.t, 0, 1e14) then
      no('bad_time', 'counted_at must be a time')
    elseif r.t > now + cfg.skew then
      no('future', 'counted_at is ' .. math.floor((r.t - now) / 1000) .. ' s in the future')
    else
      local v = redis.call('HMGET', lk.pos, 'on_hand', 'committed', 'safety_stock', 'cc', 'sa')
      if not v[1] then
        no('unknown_position', 'no position for ' .. r.sku .. ' at ' .. r.loc)
      else
        local cur, cm, ss = tonumber(v[1]), tonumber(v[2] or '0'), tonumber(v[3] or '0')
        local cc = {}
        if v[4] then cc = cjson.decode(v[4]) end
        local prior, later = nil, nil
        for _, c in ipairs(cc) do
          if c.id == req.cid then prior = c end
          if c.t >= r.t and c.id ~= req.cid then later = c end
        end
        if prior and prior.row == r.row then
          res.st = 'already'
          res.before, res.after, res.drift, res.at_t = prior.b, prior.a, prior.d, prior.at
          res.committed, res.safety_stock = cm, ss
        elseif prior then
          no('duplicate', 'row ' .. string.format('%d', prior.row) .. ' of this count already counted ' .. r.sku .. ' at ' .. r.loc)
        elseif later then
          no('superseded', 'a count taken at the same time or later (' .. later.id .. ') was already applied')
        elseif v[5] and tonumber(v[5]) > r.t then
          no('superseded', 'on_hand was set after the count was taken')
        else
          local at_t = on_hand_at(lk.log, r.t, cur)
          -- counts logged after r.t were taken before it (a later one supersedes this
          -- row): their drift belongs to the book as of r.t
          local forgotten = #cc > 0 and (cc[1].ap or 0) > r.t and (cc[1].n or 1) > 1
          if at_t ~= nil then
            for _, c in ipairs(cc) do
              if (c.ap or 0) > r.t then at_t = at_t + c.d end
            end
          end
          if at_t == nil then
            no('before_retention', 'the movement log no longer reaches back to counted_at')
          elseif forgotten then
            no('before_retention', 'more counts were applied after counted_at than the position keeps')
          else
            local drift = r.q - at_t
            local after = cur + drift
            if after < 0 then
              no('negative', 'counted ' .. r.q .. ' but ' .. (at_t - cur) .. ' units left after the count')
            elseif after > cfg.max_on_hand then
              no('bad_count', 'on_hand would exceed ' .. cfg.max_on_hand)
            else
              res.before, res.after, res.drift, res.at_t = cur, after, drift, at_t
              res.committed, res.safety_stock = cm, ss
              if req.dry then
                res.st = 'dry'
                if cm > after - ss then
                  -- as the applied count would see it: time-phased when promises are dated
                  local view = read_pos(lk.pos)
                  view.on_hand = after
                  local slack = position_slack(lk, view, now, ss)
                  if slack < ss then res.at_risk = ss - slack end
                end
              else
                res.st = 'applied'
                local mid = redis.call('XADD', lk.log, 'MAXLEN', '~', cfg.log_max, '*',
                  'kind', 'count', 'reason', 'cycle_count', 'actor', str(cfg.actor),
                  'source', str(cfg.source), 'ref', req.cid, 'rid', '', 'channel', '',
                  'on_hand_before', cur, 'on_hand_after', after,
                  'committed_before', cm, 'committed_after', cm, 'at', now,
                  'counted', r.q, 'counted_at', string.format('%d', r.t), 'drift', drift,
                  'row', string.format('%d', r.row))
                local n = 1
                if #cc > 0 then n = (cc[#cc].n or #cc) + 1 end
                cc[#cc + 1] = { id = req.cid, row = r.row, t = r.t, b = cur, a = after, d = drift,
                  at = at_t, ap = tonumber(string.match(mid, '^(%d+)')), n = n }
                while #cc > CC_KEEP do table.remove(cc, 1) end
                redis.call('HSET', lk.pos, 'on_hand', after, 'cc', cjson.encode(cc))
                if drift ~= 0 then
                  emit(cfg, bk.events, 'counted', '', '', now, { sku = r.sku, location = r.loc,
                    count = req.cid, counted = r.q, counted_at = r.t, drift = drift,
                    on_hand_before = cur, on_hand_after = after })
                end
                -- uncovered() reads the position again: only worth it when the figures just
                -- written leave it short (most counts leave it covered)
                local ex = nil
                if cm > after - ss then
                  ex = uncovered(cfg, lk, bk.res, r.sku, r.loc, 'cycle_count', now, req.prio)
                end
                if ex then
                  ex.count = req.cid
                  res.exception = raise_exception(cfg, bk, g.b, '', '', now, ex)
                  res.at_risk = ex.shortfall
                end
                if drift > 0 then
                  local filled = fill_backorders(cfg, lk, bk, now)
                  if #filled > 0 then res.filled = filled end
                end
                replen_check(cfg, lk.pos, bk.rp, bk.events, r.sku, r.loc, now)
              end
            end
          end
        end
      end
    end
  end
end
return cjson.encode({ ok = 1, now = now, rows = out })
