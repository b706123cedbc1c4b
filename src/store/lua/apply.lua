-- Applies a batch of events to the read model, atomically with the checkpoint:
-- the users and the offset of the last applied event per partition change
-- together, so a reader that sees a checkpoint sees the data it covers, and a
-- replayed event changes nothing.
--
-- The rule over the log (docs/design.md): for each id, the first UserCreated
-- in its partition's order creates the user; later ones create nothing. A
-- request id maps to the user its request created.
--
-- Fencing: the projector says which checkpoint it resumed from for each
-- partition in the batch. If Redis holds another (it lost its data, or
-- another instance applied meanwhile during a rebalance), nothing is written
-- and the script answers {'moved', partition, checkpoint or ''}: the projector
-- then resumes from what Redis holds.
--
-- KEYS[1]   checkpoint hash; KEYS[2] rebuild hash
-- KEYS[3..] two keys per event: the user's key and the request key (KEYS[1]
--           stands in for "none": a record that only moves the checkpoint,
--           one sent to the dead-letter topic, or an event without request id)
-- ARGV[1]   number of partitions P, then P pairs (partition, expected checkpoint)
-- then, per event in log order: partition, offset, user value ('' for none),
--           request value (the user id), request expiry (unix seconds)
--
-- Returns {'ok', applied, duplicates, skipped} | {'moved', partition, checkpoint}
local nparts = tonumber(ARGV[1])
local current = {}
for i = 0, nparts - 1 do
  local partition, expected = ARGV[2 + i * 2], ARGV[3 + i * 2]
  local held = redis.call('HGET', KEYS[1], partition)
  if held ~= expected then
    return {'moved', partition, held or ''}
  end
  current[partition] = tonumber(held)
end

local applied, duplicates, skipped = 0, 0, 0
local raw = {} -- offsets as sent: Lua would print large numbers as 1e+15
local base = 2 + nparts * 2
local nevents = (#KEYS - 2) / 2
for e = 0, nevents - 1 do
  local ukey, rkey = KEYS[3 + e * 2], KEYS[4 + e * 2]
  local a = base + e * 5
  local partition, offset, value = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2]
  if offset > current[partition] then
    if value ~= '' then
      if redis.call('SET', ukey, value, 'NX') then
        applied = applied + 1
        if rkey ~= KEYS[1] then
          redis.call('SET', rkey, ARGV[a + 3], 'NX', 'EXAT', ARGV[a + 4])
        end
      else
        duplicates = duplicates + 1
      end
    end
    current[partition] = offset
    raw[partition] = ARGV[a + 1]
  else
    skipped = skipped + 1
  end
end
for partition, offset in pairs(raw) do
  redis.call('HSET', KEYS[1], partition, offset)
  local target = redis.call('HGET', KEYS[2], partition)
  if target and tonumber(offset) >= tonumber(target) - 1 then
    redis.call('HDEL', KEYS[2], partition)
  end
end
return {'ok', applied, duplicates, skipped}
