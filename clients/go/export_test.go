package userclient

import "time"

// SetKeepaliveForTest shortens the keepalive of connections dialed from now
// on, so that a test sees a dead connection dropped within seconds (grpc-go
// raises a Time below 10 s to 10 s); the returned function restores it.
func SetKeepaliveForTest(tm, timeout time.Duration) (restore func()) {
	saved := keepaliveParams
	keepaliveParams.Time, keepaliveParams.Timeout = tm, timeout
	return func() { keepaliveParams = saved }
}
