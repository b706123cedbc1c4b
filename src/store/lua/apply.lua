-- Applies a batch of one partition's events to the read model, atomically
-- with the partition's checkpoint: the users and the offset of the last
-- applied event change together, so a reader that sees a checkpoint sees the
-- data it covers, and a replayed event changes nothing. Every key carries the
-- partition's hash tag, so in a Redis Cluster they share one slot.
--
-- The rule over the log (docs/design.md): for each id, the first UserCreated
-- in its partition's order creates the user; later ones create nothing. The
-- stored user names the request whose event created it.
--
-- Fencing: the projector says which checkpoint it resumed from. If Redis
-- holds another (it lost its data, or another instance applied meanwhile
-- during a rebalance), nothing is written and the script answers
-- {'moved', checkpoint or ''}: the projector then resumes from what Redis holds.
--
-- Sealed: `user-service move-topic` ends each partition of a topic it moved
-- with a seal (sent as field '' and the new topic as value). Events after it
-- create nothing: the mover copied everything before it to the new topic,
-- and nothing after it. The checkpoint keeps `moved` (the new topic).
--
-- Re-homed: an event of the article's Go service outside its id's partition
-- is copied to that partition (docs/design.md, "The article's events") before
-- this script runs; it only moves the checkpoint here. The highest such offset
-- whose copy the brokers acknowledged is kept as `rehomed`, so that a replay
-- of the partition does not copy it again.
--
-- KEYS[1]   the partition's checkpoint hash (fields `applied`, `rebuild`,
--           `moved`, `rehomed`)
-- KEYS[2..] one key per event: the user's bucket hash (KEYS[1] stands in for
--           "none": a record that only moves the checkpoint, one sent to the
--           dead-letter topic or re-homed)
-- ARGV[1]   the expected checkpoint
-- ARGV[2]   the highest offset of this batch whose copy was acknowledged
--           ('' for none), then per event in log order: offset, the user's
--           field in its bucket (its id), user value ('' for none; with field
--           '', a seal: the topic the users moved to)
--
-- Returns {'ok', applied, duplicates, skipped, created...} | {'moved', checkpoint}
-- where `created` lists the (0-based) indexes of the events that created a user.
local held = redis.call('HGET', KEYS[1], 'applied')
if held ~= ARGV[1] then
  return {'moved', held or ''}
end
local current = tonumber(held)
local moved = redis.call('HGET', KEYS[1], 'moved')

local applied, duplicates, skipped = 0, 0, 0
local created = {}
local raw -- the offset as sent: Lua would print large numbers as 1e+15
for e = 0, #KEYS - 2 do
  local ukey = KEYS[2 + e]
  local offset, field, value = tonumber(ARGV[3 + e * 3]), ARGV[4 + e * 3], ARGV[5 + e * 3]
  if offset > current then
    if field == '' and value ~= '' then
      if not moved then
        moved = value
        redis.call('HSET', KEYS[1], 'moved', value)
      end
    elseif value ~= '' and moved then
      duplicates = duplicates + 1
    elseif value ~= '' then
      if redis.call('HSETNX', ukey, field, value) == 1 then
        applied = applied + 1
        created[#created + 1] = e
      else
        duplicates = duplicates + 1
      end
    end
    current = offset
    raw = ARGV[3 + e * 3]
  else
    skipped = skipped + 1
  end
end
if raw then
  redis.call('HSET', KEYS[1], 'applied', raw)
  local target = redis.call('HGET', KEYS[1], 'rebuild')
  if target and tonumber(raw) >= tonumber(target) - 1 then
    redis.call('HDEL', KEYS[1], 'rebuild')
  end
end
if ARGV[2] ~= '' then
  local rehomed = redis.call('HGET', KEYS[1], 'rehomed')
  if not rehomed or tonumber(ARGV[2]) > tonumber(rehomed) then
    redis.call('HSET', KEYS[1], 'rehomed', ARGV[2])
  end
end
local reply = {'ok', applied, duplicates, skipped}
for _, e in ipairs(created) do
  reply[#reply + 1] = e
end
return reply
