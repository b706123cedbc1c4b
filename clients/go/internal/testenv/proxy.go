package testenv

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"
)

// Proxy is a TCP proxy on loopback in front of an instance, so that a test
// can break the path between client and service the way a network does:
// Cut drops every open connection, Freeze makes them silent without closing
// them (a crashed host, a NAT that forgot the flow), SetUpstream sends new
// connections elsewhere. Closed when the test ends.
type Proxy struct {
	ln       net.Listener
	accepted atomic.Int64

	mu       sync.Mutex
	upstream string
	links    map[*link]struct{}
}

// link is one proxied connection: the client's side and the upstream's.
type link struct {
	client, server net.Conn
	frozen         atomic.Bool
}

func (l *link) close() { _ = l.client.Close(); _ = l.server.Close() }

// NewProxy listens on a free loopback port and forwards to upstream.
func NewProxy(t testing.TB, upstream string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{ln: ln, upstream: upstream, links: map[*link]struct{}{}}
	go p.serve()
	t.Cleanup(func() { _ = ln.Close(); p.Cut() })
	return p
}

// Addr is where clients connect.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Accepted is how many connections the proxy has taken so far.
func (p *Proxy) Accepted() int { return int(p.accepted.Load()) }

// SetUpstream sends the connections accepted from now on to addr.
func (p *Proxy) SetUpstream(addr string) {
	p.mu.Lock()
	p.upstream = addr
	p.mu.Unlock()
}

// Cut closes every open connection, both sides.
func (p *Proxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for l := range p.links {
		l.close()
	}
}

// Freeze makes the open connections drop every byte, both ways, and stay
// open; connections accepted later work.
func (p *Proxy) Freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for l := range p.links {
		l.frozen.Store(true)
	}
}

func (p *Proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		p.accepted.Add(1)
		go p.handle(c)
	}
}

func (p *Proxy) handle(c net.Conn) {
	p.mu.Lock()
	up := p.upstream
	p.mu.Unlock()
	s, err := net.Dial("tcp", up)
	if err != nil {
		_ = c.Close()
		return
	}
	l := &link{client: c, server: s}
	p.mu.Lock()
	p.links[l] = struct{}{}
	p.mu.Unlock()
	done := make(chan struct{}, 2)
	go func() { pump(l, s, c); done <- struct{}{} }()
	go func() { pump(l, c, s); done <- struct{}{} }()
	<-done // one side ended: end both
	l.close()
	<-done
	p.mu.Lock()
	delete(p.links, l)
	p.mu.Unlock()
}

// pump copies src to dst until either fails; while the link is frozen what
// it reads is dropped.
func pump(l *link, dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !l.frozen.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
