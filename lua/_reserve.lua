-- _reserve.lua: the body of one reservation as a function, so lua/reserve.lua (one call)
-- and lua/reserve_many.lua (several, one after another, in one script call) run the same
-- code. atp.scripts inlines it after _lib (`--- @include "_reserve"`); the KEYS, ARGV and
-- replies are documented in lua/reserve.lua.
--   cfg  the decoded settings argument; req  the decoded request; keys  this reservation's
--   KEYS (a table laid out as part_keys walks it).
-- Returns the reply text, exactly what reserve.lua answers. Everything is validated before
-- the first write (I7); a refusal writes nothing but the reclaim of lapsed holds.
--
-- What a batch of reservations (reserve_many) shares, `ctx` (reserve_ctx): the time (one
-- TIME for the script call, as if the batch arrived at one instant), each bucket's rules
-- version (no reserve changes it), which positions' lapsed holds were already reclaimed
-- at that time (a hold made in the batch lapses later), and the buckets' unit totals to
-- add when the call ends (reserve_stat; the caller runs reserve_flush). Its `now` and
-- derived figures are set by the first reservation that gets that far.
--
-- Cost matters here: every reservation of a flash sale runs this, on one server thread, so
-- the write path reads each position once (read_pos_r) and writes its figures back in one
-- HSET (commit_reserve), and builds the stored record's JSON as text, with each repeated
-- number formatted once (num_s), instead of cjson.encode: each server call (~8k
-- instructions even for an HGET) and each number cjson formats (~2.4k) counts. Measured with
-- callgrind on the server, batches of 16: 590k instructions per reservation before these
-- changes, ~479k after.

local NUMS = {}  -- number -> its text, for the figures a batch repeats
local function num_s(n)
  local t = NUMS[n]
  if t == nil then
    t = string.format('%d', n)
    NUMS[n] = t
  end
  return t
end

-- A text as a JSON string (cjson escapes it; cheaper than a Lua pattern check first).
local jstr = cjson.encode

-- The location of a line's candidate `ci` (a routed line names several; else its one).
local function loc_at(l, ci)
  local ls = l.locs
  if ls then return ls[ci] end
  return l.loc
end

local function reserve_ctx()
  return { rv = {}, reclaimed = {}, stats = {} }
end

-- The buckets' unit totals (stat in _lib) the reservations added, written once per bucket
-- when the call ends (reserve_flush): no reserve reads them, and sums commute.
local function reserve_stat(ctx, stats_key, committed, held)
  local t = ctx.stats[stats_key]
  if t == nil then
    t = { 0, 0 }
    ctx.stats[stats_key] = t
  end
  t[1] = t[1] + committed
  t[2] = t[2] + held
end

local function reserve_flush(ctx)
  for key, t in pairs(ctx.stats) do stat(key, t[1], t[2]) end
end

-- read_pos, plus what a reserve writes back or checks afterwards: the channel's committed
-- units (`chv`), today's demand (`hv`, false when today has none yet) and the replenishment
-- levels and signal (`rop`, `out`, `rs`); `oh_s` is on_hand as stored.
local function read_pos_r(key, ch_field, hday)
  local v = redis.call('HMGET', key, 'on_hand', 'committed', 'safety_stock', 'inbound', 'dated',
    'bo', ch_field, hday, 'rop', 'out', 'rs')
  local p = pos_of(v)
  if p then
    p.oh_s, p.chv, p.hv = v[1], tonumber(v[7] or '0'), v[8] and tonumber(v[8])
    p.rop, p.out, p.rs = v[9] and tonumber(v[9]), v[10] and tonumber(v[10]), v[11] == '1'
  end
  return p
end

-- commit_units (in _lib) for a reserve, from the figures read_pos_r read in this call (no
-- other write touched the position since): committed, the channel's units, today's demand
-- (and the dated total) in one HSET, then what changes beside the position (commit_beside);
-- `pos` is kept up to date. Returns committed before and after.
local function commit_reserve(lk, pos, qty, ch_field, cu, rd, ctx)
  local before = pos.committed
  local after = before + qty
  local first_today = not pos.hv
  pos.committed = after
  pos.chv = pos.chv + qty
  pos.hv = (pos.hv or 0) + qty
  if rd then
    pos.dated = pos.dated + qty
    redis.call('HSET', lk.pos, 'committed', string.format('%d', after), ch_field,
      string.format('%d', pos.chv), ctx.hday, string.format('%d', pos.hv),
      'dated', string.format('%d', pos.dated))
  else
    redis.call('HSET', lk.pos, 'committed', string.format('%d', after), ch_field,
      string.format('%d', pos.chv), ctx.hday, string.format('%d', pos.hv))
  end
  if first_today then trim_history(lk.pos, ctx.day) end
  commit_beside(lk, ch_field, cu, rd, qty)
  return before, after
end

local function reserve_one(cfg, req, keys, ctx)
  -- validate everything before the first write
  if not is_text(req.id, 128) then return refuse('bad_request', 'reservation id must be 1-128 characters') end
  if not is_text(req.ch, 64) then return refuse('bad_request', 'channel must be 1-64 characters') end
  if not is_int(req.hold, 0, cfg.max_hold) then return refuse('bad_request', 'hold must be 0..' .. cfg.max_hold .. ' ms') end
  if not is_text(req.fp, 128) then return refuse('bad_request', 'missing request fingerprint') end
  if not is_int(req.rv, 0, 1e15) then return refuse('bad_request', 'rv must be a rules version') end
  if req.cu ~= nil and not is_text(req.cu, 128) then return refuse('bad_request', 'customer id must be 1-128 characters') end
  if req.rd ~= nil and not is_int(req.rd, 0, 1e6) then return refuse('bad_request', 'rd must be a day number') end
  if req.pp ~= nil and not is_int(req.pp, 0, 1000000) then return refuse('bad_request', 'pp must be a priority') end
  if req.bo ~= nil and type(req.bo) ~= 'boolean' then return refuse('bad_request', 'bo must be true or false') end
  if req.home ~= nil and not is_int(req.home, 0, 16383) then return refuse('bad_request', 'home must be a bucket number') end
  local prio = req.pp or 0
  local shape_err = validate_parts_shape(req, cfg.max_lines)
  if shape_err then return refuse('bad_request', shape_err) end
  local seen, seen_b, routed_sku, sku_lines, nlines = {}, {}, {}, {}, 0
  for _, p in ipairs(req.parts) do
    if type(p.lines) ~= 'table' or #p.lines ~= p.n then return refuse('bad_request', 'part line count mismatch') end
    -- one part per bucket: two parts in one bucket would overwrite each other's record (I2)
    if not is_int(p.b, 0, 16383) or seen_b[p.b] then return refuse('bad_request', 'each part needs its own bucket number') end
    seen_b[p.b] = true
    for li, l in ipairs(p.lines) do
      nlines = nlines + 1
      if not is_text(l.sku, 64) then return refuse('bad_request', 'each line needs a sku') end
      if not is_int(l.qty, 1, cfg.max_qty) then return refuse('bad_request', 'qty must be a whole number from 1 to ' .. cfg.max_qty) end
      local nc = 1
      if type(p.c) == 'table' then nc = p.c[li] end
      if l.locs ~= nil then
        if type(l.locs) ~= 'table' or #l.locs == 0 or #l.locs ~= nc then return refuse('bad_request', 'routed line candidates do not match KEYS') end
        local dup = {}
        for _, loc in ipairs(l.locs) do
          if not is_text(loc, 64) or dup[loc] then return refuse('bad_request', 'routed line needs distinct locations') end
          dup[loc] = true
        end
        routed_sku[l.sku] = true
      else
        if not is_text(l.loc, 64) then return refuse('bad_request', 'each line needs a location') end
        if nc ~= 1 then return refuse('bad_request', 'a line with a location has one candidate') end
        local k = l.sku .. '|' .. l.loc
        if seen[k] then return refuse('bad_request', 'duplicate line for ' .. l.sku .. ' at ' .. l.loc) end
        seen[k] = true
      end
      if l.pr ~= nil then
        if type(l.pr) ~= 'table' or #l.pr ~= nc then return refuse('bad_request', 'pr needs one list per candidate') end
        for _, cp in ipairs(l.pr) do
          if type(cp) ~= 'table' then return refuse('bad_request', 'pr entries are lists') end
          for _, gp in ipairs(cp) do
            if type(gp) ~= 'table' or not is_text(gp[1], 64) or not is_int(gp[2], 0, 1e13) then
              return refuse('bad_request', 'pr entries are [channel, units]')
            end
          end
        end
      end
      if l.cap ~= nil and not is_int(l.cap, 0, 1e13) then return refuse('bad_request', 'cap must be a whole number') end
      if l.bl ~= nil and not is_int(l.bl, 1, 1e13) then return refuse('bad_request', 'bl must be a whole number') end
      if l.split ~= nil and type(l.split) ~= 'boolean' then return refuse('bad_request', 'split must be true or false') end
      sku_lines[l.sku] = (sku_lines[l.sku] or 0) + 1
    end
  end
  if nlines > cfg.max_lines then return refuse('bad_request', 'too many lines') end
  for sku in pairs(routed_sku) do
    if sku_lines[sku] > 1 then return refuse('bad_request', 'a routed line must be the only line for ' .. sku) end
  end
  if req.bo then
    local l1 = req.parts[1].lines[1]
    if #req.parts ~= 1 or nlines ~= 1 or l1.locs ~= nil or req.hold ~= 0 or req.rd ~= nil then
      return refuse('bad_request', 'a backorder is one line at a location, confirmed at once, without a date')
    end
  end
  local idx, pk = part_keys(req.idx, req.parts, keys)
  if idx == nil then return pk end

  -- every part's bucket must enforce the rules version the caller resolved the request with,
  -- so no reservation is decided by a mix of two versions (atp.rules)
  for pi in ipairs(req.parts) do
    local sk = pk[pi].stats
    local have = ctx.rv[sk]
    if have == nil then
      have = bucket_rules_version(sk)
      ctx.rv[sk] = have
    end
    if have ~= req.rv then return refuse('rules_stale', 'the rules changed', { have = have }) end
  end
  -- a buyer limit needs the buyer (checked under the version just confirmed, before any write)
  if req.cu == nil then
    for _, p in ipairs(req.parts) do
      for _, l in ipairs(p.lines) do
        if l.bl ~= nil then
          return refuse('customer_required', l.sku .. ' has a buyer limit; the reservation needs a customer_id', { sku = l.sku })
        end
      end
    end
  end

  -- idempotency (I3): the same id returns the original outcome, another request conflicts
  local prior = nil
  if idx then
    prior = redis.call('HGET', idx, req.id)
  else
    prior = redis.call('HGET', pk[1].res, req.id)
  end
  if prior then
    if cjson.decode(prior).fp ~= req.fp then
      return refuse('conflict', 'reservation ' .. req.id .. ' exists with a different request')
    end
    local recs = {}
    for pi, e in ipairs(pk) do
      local raw = redis.call('HGET', e.res, req.id)
      if raw then recs[#recs + 1] = cjson.decode(raw) end
    end
    return cjson.encode({ ok = 1, replay = 1, parts = recs })
  end

  local now = ctx.now
  if now == nil then
    now = now_ms()
    ctx.now, ctx.now_s, ctx.day = now, string.format('%d', now), today_of(now)
    ctx.hday = 'h:' .. string.format('%d', ctx.day)
    ctx.lx_cr = string.format('%013d', 9999999999999 - now)
  end
  local today = ctx.day
  if req.rd ~= nil and req.rd < today then req.rd = today end
  local ch_field = 'ch:' .. req.ch

  -- reclaim expired holds on the positions this call may touch (bounded), then decide
  for pi, p in ipairs(req.parts) do
    local e = pk[pi]
    for li, l in ipairs(p.lines) do
      for ci, lk in ipairs(e.cands[li]) do
        if not ctx.reclaimed[lk.hx] then
          local units, looked = reclaim_expired(cfg, lk, e, l.sku, loc_at(l, ci), now, cfg.reclaim)
          -- units lapsed holds give back go first to the backorders waiting for them
          if units > 0 then
            fill_backorders(cfg, lk, e, now)
            replen_check(cfg, lk.pos, e.rp, e.events, l.sku, loc_at(l, ci), now)
          end
          if looked < cfg.reclaim then ctx.reclaimed[lk.hx] = true end
        end
      end
    end
  end

  -- SKU-wide figures: committed by this channel (caps) and by this customer (buyer limits)
  local cap_left, buyer, want = {}, {}, {}
  local short, unknown, over = {}, {}, nil
  for pi, p in ipairs(req.parts) do
    for li, l in ipairs(p.lines) do
      local agg = pk[pi].lines[li].agg
      want[l.sku] = (want[l.sku] or 0) + l.qty
      if l.cap ~= nil and cap_left[l.sku] == nil then
        cap_left[l.sku] = l.cap - tonumber(redis.call('HGET', agg, 'ch:' .. req.ch) or '0')
      end
      if l.bl ~= nil and buyer[l.sku] == nil then
        buyer[l.sku] = { limit = l.bl, held = tonumber(redis.call('HGET', agg, 'cu:' .. req.cu) or '0') }
      end
    end
  end
  for sku, b in pairs(buyer) do
    if b.held + want[sku] > b.limit then
      over = { sku = sku, limit = b.limit, held = b.held, requested = want[sku] }
    end
  end

  -- per line, the ATP of each candidate; a routed line takes the first candidate that holds
  -- it whole, else (split) the candidates in order
  local plan = {}   -- plan[pi][li] = list of {ci, qty}
  local poss = {}   -- poss[pi][li][ci] = the position as read while deciding (for the write)
  for pi, p in ipairs(req.parts) do
    plan[pi] = {}
    poss[pi] = {}
    for li, l in ipairs(p.lines) do
      local ncand = #pk[pi].cands[li]
      local avail, raw_ok, any, queued = {}, false, false, false
      -- the first candidate's schedule, for the promise day of a refusal
      local s_lk, s_pos, s_base, s_pts, s_need = nil, nil, nil, nil, nil
      poss[pi][li] = {}
      for ci, lk in ipairs(pk[pi].cands[li]) do
        local pos = read_pos_r(lk.pos, ch_field, ctx.hday)
        if pos then
          any = true
          poss[pi][li][ci] = pos
          local prs = l.pr and l.pr[ci]
          local prot = 0
          if prs then
            local _
            _, prot = channel_atp(pos, req.ch, prs, function(g)
              return tonumber(redis.call('HGET', lk.pos, 'ch:' .. g) or '0')
            end)
          end
          -- backorders at this channel's priority or above came first: theirs, not ours
          local ahead = waiting_ahead(lk.pos, pos, prio)
          -- time-phased when dated (slack_for): exact whenever the line is short of it; a
          -- line the shelf covers is taken whole from here, so no other figure is needed
          local need = l.qty + pos.safety_stock + prot + ahead
          local slack, base, pts = slack_for(lk.sch, pos, today, req.rd, need)
          avail[ci] = math.max(0, slack - pos.safety_stock - prot - ahead)
          if slack - pos.safety_stock >= l.qty then raw_ok = true end
          if ahead > 0 and slack - pos.safety_stock - prot >= l.qty then queued = true end
          if ci == 1 then
            s_lk, s_pos, s_base, s_pts, s_need = lk, pos, base, pts, need
          end
        else
          avail[ci] = 0
        end
      end
      if not any and not l.locs then
        unknown[#unknown + 1] = { sku = l.sku, location = l.loc }
      else
        local take = nil
        for ci = 1, ncand do
          if avail[ci] >= l.qty then take = { { ci, l.qty } }; break end
        end
        local best = 0
        for ci = 1, ncand do
          if l.split then best = best + avail[ci] elseif avail[ci] > best then best = avail[ci] end
        end
        if not take and l.split and best >= l.qty then
          take = {}
          local rest = l.qty
          for ci = 1, ncand do
            if rest == 0 then break end
            local q = math.min(rest, avail[ci])
            if q > 0 then take[#take + 1] = { ci, q }; rest = rest - q end
          end
        end
        local cl = cap_left[l.sku]
        local limited = 'stock'
        if take and cl ~= nil and want[l.sku] > cl then limited = 'cap'; take = nil end
        if not take then
          if limited ~= 'cap' and queued then
            limited = 'backorders'
          elseif limited ~= 'cap' and raw_ok then
            limited = 'protection'
          end
          local av = best
          if cl ~= nil and cl < av then av = math.max(0, cl) end
          local loc = l.loc
          if l.locs then loc = cjson.null end
          local sl = { sku = l.sku, location = loc, requested = l.qty, available = av, limited_by = limited }
          -- when could it be had? (a located line, not held back by its cap)
          if not l.locs and limited ~= 'cap' and s_pos and s_pos.inbound > 0 then
            local base, pts = s_base, s_pts
            if not pts then base, pts = phased_points(s_lk.sch, s_pos, today) end
            sl.promise_day = promise_day(base, pts, today, s_need)
          end
          short[#short + 1] = sl
        end
        plan[pi][li] = take
      end
    end
  end
  if #unknown > 0 then return refuse('unknown_position', 'no such position', { lines = unknown }) end
  if over then
    return refuse('buyer_limit', 'customer ' .. req.cu .. ' may hold at most ' .. over.limit .. ' of ' .. over.sku, over)
  end
  local l1 = req.parts[1].lines[1]
  if #short > 0 and req.bo and cap_left[l1.sku] ~= nil and want[l1.sku] > cap_left[l1.sku] then
    short[1].limited_by = 'cap'  -- supply cannot lift a cap: refused, not queued
  end
  if #short > 0 and req.bo and short[1].limited_by ~= 'cap' then
    -- it asked to wait: into the position's queue, by its channel's priority, then arrival
    local p1 = req.parts[1]
    local e = pk[1]
    local rec = { id = req.id, ch = req.ch, st = 'backordered', cr = now, ex = 0, up = now, fp = req.fp,
                  home = req.home, parts = { p1.b }, rv = req.rv, ful = {}, bq = { prio, 0 },
                  lines = { { sku = l1.sku, loc = l1.loc, qty = l1.qty, shipped = 0, short = 0, released = 0 } } }
    if req.cu then rec.cu = req.cu end
    if l1.pr then rec.pr = l1.pr[1] end
    if l1.cap ~= nil then rec.cap = l1.cap end
    if l1.bl ~= nil then rec.bl = l1.bl end
    bo_enqueue(e.cands[1][1], rec)
    local rec_json = cjson.encode(rec)
    redis.call('HSET', e.res, req.id, rec_json)
    if idx then
      local ie = { fp = req.fp, ch = req.ch, cr = now, parts = { { b = p1.b, lines = { { l1.sku, l1.loc } } } } }
      if req.cu then ie.cu = req.cu end
      redis.call('HSET', idx, req.id, cjson.encode(ie))
    end
    emit(cfg, e.events, 'backordered', req.id, req.ch, now, rec_json)
    replen_check(cfg, e.cands[1][1].pos, e.rp, e.events, l1.sku, l1.loc, now)
    return '{"ok":1,"replay":0,"st":"backordered","cr":' .. string.format('%d', now) ..
      ',"ex":0,"rv":' .. string.format('%d', req.rv) .. '}'
  end
  if #short > 0 then return refuse('insufficient', 'not enough available to promise', { lines = short }) end

  -- write (the record as JSON text: see the note above reserve_one)
  local held = req.hold > 0
  local ex, ex_s, st, flag = 0, '0', 'confirmed', '1'
  if held then
    ex = now + req.hold
    ex_s, st, flag = string.format('%d', ex), 'held', '0'
  end
  local now_s = ctx.now_s
  local routed = next(routed_sku) ~= nil
  local id_j, ch_j, fp_j = jstr(req.id), jstr(req.ch), jstr(req.fp)
  local cu_j = ''
  if req.cu then cu_j = ',"cu":' .. jstr(req.cu) end
  local buckets, index_parts, taken = {}, {}, {}
  for pi, p in ipairs(req.parts) do buckets[pi] = num_s(p.b) end
  -- every field of a part's record but its lines (the same in each part)
  local head = '{"id":' .. id_j .. ',"ch":' .. ch_j .. ',"st":"' .. st .. '","cr":' .. now_s ..
    ',"ex":' .. ex_s .. ',"up":' .. now_s .. ',"fp":' .. fp_j .. ',"parts":[' ..
    table.concat(buckets, ',') .. '],"rv":' .. num_s(req.rv) .. ',"ful":{}' .. cu_j
  if req.home ~= nil then head = head .. ',"home":' .. num_s(req.home) end
  if req.rd ~= nil then head = head .. ',"rd":' .. num_s(req.rd) end
  -- the live index member (lx_member in _lib, for this status and time)
  local member = req.ch .. ':' .. flag .. ':' .. ctx.lx_cr .. ':' .. req.id
  for pi, p in ipairs(req.parts) do
    local e = pk[pi]
    local ls, lj, units = {}, {}, 0
    for li, l in ipairs(p.lines) do
      for _, t in ipairs(plan[pi][li]) do
        local ci, q = t[1], t[2]
        local lk, loc, pos = e.cands[li][ci], loc_at(l, ci), poss[pi][li][ci]
        units = units + q
        local before, after = commit_reserve(lk, pos, q, ch_field, req.cu, req.rd, ctx)
        log_move(cfg, lk.log, 'reserve', { reason = st, rid = req.id, channel = req.ch,
          ohb = pos.oh_s, oha = pos.oh_s, cmb = string.format('%d', before),
          cma = string.format('%d', after), at = now_s })
        if held then redis.call('ZADD', lk.hx, ex_s, req.id) end
        redis.call('ZADD', lk.lx, '0', member)
        local sku_j, loc_j = jstr(l.sku), jstr(loc)
        lj[#lj + 1] = '{"sku":' .. sku_j .. ',"loc":' .. loc_j .. ',"qty":' .. num_s(q) ..
          ',"shipped":0,"short":0,"released":0}'
        ls[#ls + 1] = '[' .. sku_j .. ',' .. loc_j .. ']'
        if routed then taken[#taken + 1] = { l.sku, loc, q } end
      end
    end
    index_parts[pi] = '{"b":' .. buckets[pi] .. ',"lines":[' .. table.concat(ls, ',') .. ']}'
    if held then reserve_stat(ctx, e.stats, units, units) else reserve_stat(ctx, e.stats, units, 0) end
    local rec_json = head .. ',"lines":[' .. table.concat(lj, ',') .. ']}'
    redis.call('HSET', e.res, req.id, rec_json)
    if held then redis.call('ZADD', e.holds, ex_s, req.id) end
    -- the event carries the part as stored (status, expiry, lines, rules version)
    emit(cfg, e.events, 'reserved', req.id, req.ch, now_s, rec_json)
    for li, l in ipairs(p.lines) do
      for _, t in ipairs(plan[pi][li]) do
        local pos = poss[pi][li][t[1]]
        if pos.rop then
          -- replen_check, from the figures just written
          if replen_apply(cfg, e.cands[li][t[1]].pos, e.rp, e.events, l.sku, loc_at(l, t[1]), now,
              pos.rop, pos.out or pos.rop, pos.rs, pos.on_hand, pos.committed, pos.inbound,
              pos.bo) then
            pos.rs = not pos.rs
          end
        end
      end
    end
  end
  if idx then
    redis.call('HSET', idx, req.id, '{"fp":' .. fp_j .. ',"ch":' .. ch_j .. ',"cr":' .. now_s ..
      ',"parts":[' .. table.concat(index_parts, ',') .. ']' .. cu_j .. '}')
  end
  local tail = ''
  if routed then tail = ',"lines":' .. cjson.encode(taken) end
  if req.rd ~= nil then tail = tail .. ',"rd":' .. num_s(req.rd) end
  return '{"ok":1,"replay":0,"st":"' .. st .. '","cr":' .. now_s .. ',"ex":' .. ex_s ..
    ',"rv":' .. num_s(req.rv) .. tail .. '}'
end
