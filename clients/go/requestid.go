package userclient

import (
	"context"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	userv1 "github.com/user-service/user-service/clients/go/gen/user/v1"
)

// fillRequestID is the unary client interceptor Dial installs: a
// CreateUserRequest with an empty request_id is sent with a fresh UUID
// instead. It runs once per call, before the first attempt, so every retry of
// the call (grpc-go resends the same serialized message) carries the same id,
// and the service answers the retries with the first answer: no second user.
//
// The caller's message is left as it is (a clone is sent), so a request
// reused as a template, or shared by goroutines, never carries an id from an
// earlier call. ReportRequestID tells the caller the id that was sent.
func fillRequestID(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	if r, ok := req.(*userv1.CreateUserRequest); ok {
		if r.GetRequestId() == "" {
			r = proto.CloneOf(r)
			r.RequestId = uuid.NewString()
			req = r
		}
		for _, o := range opts {
			if rep, ok := o.(requestIDReport); ok {
				*rep.to = r.GetRequestId()
			}
		}
	}
	return invoker(ctx, method, req, reply, cc, opts...)
}

// ReportRequestID is a call option for CreateUser that stores in *to the
// request_id the call was sent with: the caller's own, or the UUID that
// Dial's interceptor chose for an empty one. Keep it to retry the create
// later (after the call's own retries gave up) with the same id, or to find
// the call in the service's logs.
//
//	var rid string
//	resp, err := c.Users.CreateUser(ctx, req, userclient.ReportRequestID(&rid))
//
// It is set before the call is sent, also when the call then fails. On a
// connection made without Dial it leaves *to as it is.
func ReportRequestID(to *string) grpc.CallOption { return requestIDReport{to: to} }

// requestIDReport carries ReportRequestID's pointer to the interceptor;
// grpc.EmptyCallOption makes it a CallOption that grpc-go itself ignores.
type requestIDReport struct {
	grpc.EmptyCallOption
	to *string
}
