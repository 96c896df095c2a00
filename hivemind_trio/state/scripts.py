"""The Lua scripts of the shared state (SPEC §7.5), one atomic step each.

Every script reads the clock with ``TIME`` inside Redis: instances on
different machines (whose monotonic clocks share no origin) agree on one
clock, the server's.  Redis 7 replicates a script's effects, not the script,
so reading TIME is allowed.  Numbers go back as strings: Redis turns a Lua
number into an integer reply, which would cut waits to whole seconds.

Keys of one lane share a hash tag (``{<lane id>}``) so a cluster keeps them
on one node.  The lane id is a hash of the lane key, which itself holds only
a credential *fingerprint*: no credential ever reaches Redis.

- ``<p>:{<lane>}:leases``  ZSET lease id -> expiry.  One lease per request in
  flight upstream, from any instance; the shared window is its size.
- ``<p>:{<lane>}:log``     ZSET "<lease id>|<tokens>" -> admission time: the
  sliding window of admissions for rpm/tpm pacing.
- ``<p>:{<lane>}:gate``    HASH paused_until, open_until, probe_until, prober,
  learned_rpm, tok (tokens in the log).
- ``<p>:budget:<counter key>`` HASH used/reserved tokens and USD, requests;
  ``<p>:budget:<counter key>:res`` ZSET of the reservations in flight.
"""

from __future__ import annotations

from .redis import Script

_NOW = """
-- Redis < 7 replicates scripts verbatim unless told to replicate effects,
-- and refuses writes after TIME without it; Redis 7 always replicates effects.
if redis.replicate_commands then redis.replicate_commands() end
local _t = redis.call('TIME')
local now = tonumber(_t[1]) + tonumber(_t[2]) / 1000000
"""

_PRUNE_LOG = """
local function prune_log(log, gate, edge)
  local old = redis.call('ZRANGEBYSCORE', log, '-inf', edge)
  if #old > 0 then
    local drop = 0
    for _, m in ipairs(old) do drop = drop + tonumber(string.match(m, '|(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', log, '-inf', edge)
    redis.call('HINCRBY', gate, 'tok', -drop)
  end
end
"""

# KEYS: leases, log, gate
# ARGV: lease id, ttl, window (0: no window), rpm, tpm, tokens, rate window,
#       instance, check rate (1/0), check breaker (1/0), poll
# -> {1, now} granted (a lease and a log entry were added), or {0, wait}.
ACQUIRE = Script(_NOW + _PRUNE_LOG + """
local ttl = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local rpm = tonumber(ARGV[4])
local tpm = tonumber(ARGV[5])
local tokens = tonumber(ARGV[6])
local rwin = tonumber(ARGV[7])
local poll = tonumber(ARGV[11])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
prune_log(KEYS[2], KEYS[3], now - rwin)
local g = redis.call('HMGET', KEYS[3], 'paused_until', 'open_until', 'probe_until', 'prober', 'learned_rpm', 'tok')
local wait = 0
if ARGV[10] == '1' then
  local open_until = tonumber(g[2] or '0')
  if open_until > now then
    wait = math.max(wait, open_until - now)
  else
    local probe_until = tonumber(g[3] or '0')
    if probe_until > now and g[4] ~= ARGV[8] then
      -- Half-open elsewhere: the instance that tripped sends the one probe.
      wait = math.max(wait, math.min(probe_until - now, math.max(poll, 0.25)))
    end
  end
end
if ARGV[9] == '1' then
  local paused = tonumber(g[1] or '0')
  if paused > now then wait = math.max(wait, paused - now) end
  local limit = rpm
  local learned = tonumber(g[5] or '0')
  if learned > 0 and (limit == 0 or learned < limit) then limit = learned end
  if limit > 0 then
    local n = redis.call('ZCARD', KEYS[2])
    if n + 1 > limit then
      local e = redis.call('ZRANGE', KEYS[2], n - limit, n - limit, 'WITHSCORES')
      wait = math.max(wait, tonumber(e[2]) + rwin - now)
    end
  end
  if tpm > 0 then
    local excess = tonumber(g[6] or '0') + math.min(tokens, tpm) - tpm
    if excess > 0 then
      local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
      for i = 1, #entries, 2 do
        excess = excess - tonumber(string.match(entries[i], '|(%d+)$'))
        if excess <= 0 then
          wait = math.max(wait, tonumber(entries[i + 1]) + rwin - now)
          break
        end
      end
    end
  end
end
if window > 0 then
  local n = redis.call('ZCARD', KEYS[1])
  if n >= window then
    -- Full: a release elsewhere opens it, which no event tells us; look again soon.
    local e = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    wait = math.max(wait, math.min(poll, tonumber(e[2]) - now))
  end
end
if wait > 0 then return {0, string.format('%.6f', wait + 0.000001)} end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1] .. '|' .. tokens)
redis.call('HINCRBY', KEYS[3], 'tok', tokens)
local keep = math.ceil(math.max(rwin, ttl) * 2 + 60)
redis.call('EXPIRE', KEYS[1], keep)
redis.call('EXPIRE', KEYS[2], keep)
if redis.call('TTL', KEYS[3]) < keep then redis.call('EXPIRE', KEYS[3], keep) end
return {1, string.format('%.6f', now)}
""")

# KEYS: leases; ARGV: ttl, lease ids...  Extends leases still held (XX: an
# expired lease is gone for good, its slot may be someone else's by now).
RENEW = Script(_NOW + """
local ttl = tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do n = n + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[i]) end
return n
""")

# KEYS: log, gate; ARGV: member, "uncount" | "recount", admitted at, bound.
# uncount: the provider refused the attempt without counting it (429/529).
# recount: it was counted on arrival, somewhere before its answer and within
# ``bound`` of admission: its slot frees no earlier than that + window.
SETTLE = Script(_NOW + """
if ARGV[2] == 'uncount' then
  if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
    redis.call('HINCRBY', KEYS[2], 'tok', -tonumber(string.match(ARGV[1], '|(%d+)$')))
  end
else
  local at = tonumber(ARGV[3])
  redis.call('ZADD', KEYS[1], 'XX', math.min(now, at + tonumber(ARGV[4])), ARGV[1])
end
return 1
""")

# KEYS: gate; ARGV: op, a, b, instance
#   pause   a = seconds        paused_until only ever extends
#   learned a = rpm            the provider's request limit, from its headers
#   trip    a = cool-down, b = probe grace: open_until, then only ``instance``
#           (which tripped) may probe until probe_until or until it closes
#   close   the breaker closed (after a successful probe)
GATE = Script(_NOW + """
local op = ARGV[1]
if op == 'pause' then
  local u = now + tonumber(ARGV[2])
  if u > tonumber(redis.call('HGET', KEYS[1], 'paused_until') or '0') then
    redis.call('HSET', KEYS[1], 'paused_until', string.format('%.6f', u))
  end
elseif op == 'learned' then
  redis.call('HSET', KEYS[1], 'learned_rpm', ARGV[2])
elseif op == 'trip' then
  local u = math.max(now + tonumber(ARGV[2]), tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0'))
  redis.call('HSET', KEYS[1], 'open_until', string.format('%.6f', u),
             'probe_until', string.format('%.6f', u + tonumber(ARGV[3])), 'prober', ARGV[4])
elseif op == 'close' then
  redis.call('HDEL', KEYS[1], 'open_until', 'probe_until', 'prober')
end
if redis.call('TTL', KEYS[1]) < 3600 then redis.call('EXPIRE', KEYS[1], 3600) end
return 1
""")

# Budget reservations are leases too: each counter hash has a ZSET beside it
# (``<counter>:res``) of the reservations in flight, member
# "<instance>:<n>|<tokens>|<usd>" -> expiry, renewed by the instance's
# heartbeat.  A crashed instance's reservations expire and their amounts
# leave ``reserved_*`` (the next reserve prunes them), so a day budget does
# not stay blocked by requests that will never settle.
_PRUNE_RESERVATIONS = """
local function unreserve(h, m)
  local t, u = string.match(m, '|(%d+)|([^|]+)$')
  if redis.call('HINCRBY', h, 'reserved_tokens', -tonumber(t)) < 0 then redis.call('HSET', h, 'reserved_tokens', 0) end
  if tonumber(u) ~= 0 and tonumber(redis.call('HINCRBYFLOAT', h, 'reserved_usd', -tonumber(u))) < 1e-9 then
    redis.call('HSET', h, 'reserved_usd', 0)
  end
end
local function prune_reservations(h, z, now)
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, m in ipairs(old) do unreserve(h, m) end
  if #old > 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', now) end
end
"""

# KEYS: n counter hashes, then their n reservation ZSETs.
# ARGV: n checks, then per check (key index, "tokens"|"usd", limit), then
#       est tokens, est usd, member, reservation ttl, then one TTL per key.
# -> {0, key index, unit, used, reserved} refused, or {1, per key: used
#    tokens, reserved tokens, used usd, reserved usd, requests} (after).
BUDGET_RESERVE = Script(_NOW + _PRUNE_RESERVATIONS + """
local n = #KEYS / 2
for i = 1, n do prune_reservations(KEYS[i], KEYS[n + i], now) end
local nc = tonumber(ARGV[1])
local base = 2 + nc * 3
local est_t = tonumber(ARGV[base])
local est_u = tonumber(ARGV[base + 1])
local member = ARGV[base + 2]
local rttl = tonumber(ARGV[base + 3])
for i = 0, nc - 1 do
  local k = KEYS[tonumber(ARGV[2 + i * 3])]
  local unit = ARGV[3 + i * 3]
  local limit = tonumber(ARGV[4 + i * 3])
  local v, need
  if unit == 'tokens' then
    v = redis.call('HMGET', k, 'used_tokens', 'reserved_tokens'); need = est_t
  else
    v = redis.call('HMGET', k, 'used_usd', 'reserved_usd'); need = est_u
  end
  local used = tonumber(v[1] or '0')
  local res = tonumber(v[2] or '0')
  if used + res >= limit or used + res + need > limit then
    return {0, ARGV[2 + i * 3], unit, tostring(used), tostring(res)}
  end
end
local out = {1}
for i = 1, n do
  local k = KEYS[i]
  redis.call('HINCRBY', k, 'reserved_tokens', est_t)
  if est_u ~= 0 then redis.call('HINCRBYFLOAT', k, 'reserved_usd', ARGV[base + 1]) end
  redis.call('HINCRBY', k, 'requests', 1)
  redis.call('ZADD', KEYS[n + i], now + rttl, member)
  local ttl = tonumber(ARGV[base + 3 + i])
  if ttl > 0 then
    redis.call('EXPIRE', k, ttl)
    redis.call('EXPIRE', KEYS[n + i], ttl)
  end
  local v = redis.call('HMGET', k, 'used_tokens', 'reserved_tokens', 'used_usd', 'reserved_usd', 'requests')
  for j = 1, 5 do out[#out + 1] = v[j] or '0' end
end
return out
""")

# KEYS: n counter hashes, then their n reservation ZSETs.
# ARGV: member ("" when the reservation was never in Redis), delta used
# tokens, delta used usd, delta requests, then one TTL per key.  The
# reservation's amounts leave ``reserved_*`` only if it is still there (not
# expired and pruned meanwhile), so a late or replayed settle never takes
# them off twice.
BUDGET_SETTLE = Script(_PRUNE_RESERVATIONS + """
local n = #KEYS / 2
for i = 1, n do
  local k = KEYS[i]
  if ARGV[1] ~= '' and redis.call('ZREM', KEYS[n + i], ARGV[1]) == 1 then unreserve(k, ARGV[1]) end
  redis.call('HINCRBY', k, 'used_tokens', ARGV[2])
  if tonumber(ARGV[3]) ~= 0 then redis.call('HINCRBYFLOAT', k, 'used_usd', ARGV[3]) end
  if tonumber(ARGV[4]) ~= 0 then redis.call('HINCRBY', k, 'requests', ARGV[4]) end
  local ttl = tonumber(ARGV[4 + i])
  if ttl > 0 then redis.call('EXPIRE', k, ttl) end
end
return 1
""")

# KEYS: reservation ZSETs; ARGV: ttl, member.  The request is still running.
BUDGET_RENEW = Script(_NOW + """
for i = 1, #KEYS do redis.call('ZADD', KEYS[i], 'XX', now + tonumber(ARGV[1]), ARGV[2]) end
return 1
""")

# KEYS: leases, log, gate; ARGV: ttl, then pairs (lease id, tokens).
# After an outage: requests admitted on local state meanwhile and still in
# flight take their leases (and log entries, as of now) in the shared books.
# -> now (server time).
ADOPT = Script(_NOW + """
local ttl = tonumber(ARGV[1])
local added = 0
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  redis.call('ZADD', KEYS[2], now, ARGV[i] .. '|' .. ARGV[i + 1])
  added = added + tonumber(ARGV[i + 1])
end
redis.call('HINCRBY', KEYS[3], 'tok', added)
return string.format('%.6f', now)
""")

# KEYS: leases; ARGV: lease ids.  The requests are over.
RELEASE = Script("return redis.call('ZREM', KEYS[1], unpack(ARGV))")

ALL = (ACQUIRE, ADOPT, RELEASE, RENEW, SETTLE, GATE, BUDGET_RESERVE, BUDGET_SETTLE, BUDGET_RENEW)
