-- Opens a partition for a projector that was just given it (or that found
-- the checkpoint moved): returns the read model's checkpoint, where
-- consumption must resume.
--
-- A partition the read model knows nothing of (a fresh Redis, or one that
-- lost its data) starts from the beginning of the log; one whose checkpoint
-- is behind what is known to have been applied before (a failover to a
-- replica that had not caught up) resumes from its checkpoint. Either way the
-- partition is marked as rebuilding until it reaches the log end seen now
-- (or what was applied before), so that readers do not take its gaps for
-- absent users.
--
-- KEYS[1] the partition's checkpoint hash: `applied` (offset of the last
--         applied event), `rebuild` (log end to reach), `rehomed`
-- ARGV[1] the partition's log end offset (high watermark), read just before
-- ARGV[2] the floor: the highest offset known to have been applied before
--         (the group's committed offset - 1, or this member's last
--         checkpoint); -1 when none is known
--
-- Returns {checkpoint, rebuild target or '', rehomed or ''}; '-1' means
-- nothing applied; `rehomed` is the highest offset whose copy to its id's
-- partition was acknowledged (see apply.lua).
local current = redis.call('HGET', KEYS[1], 'applied')
local floor = tonumber(ARGV[2])
if current and tonumber(current) >= floor then
  return {current, redis.call('HGET', KEYS[1], 'rebuild') or '',
    redis.call('HGET', KEYS[1], 'rehomed') or ''}
end
local target
if current then
  -- Behind what was applied before: the lost tail must be replayed.
  target = floor + 1
else
  current = '-1'
  redis.call('HSET', KEYS[1], 'applied', current)
  target = math.max(tonumber(ARGV[1]), floor + 1)
end
local held = tonumber(redis.call('HGET', KEYS[1], 'rebuild') or '-1')
if target > held and target > tonumber(current) + 1 then
  redis.call('HSET', KEYS[1], 'rebuild', string.format('%d', target))
end
return {current, redis.call('HGET', KEYS[1], 'rebuild') or '',
  redis.call('HGET', KEYS[1], 'rehomed') or ''}
