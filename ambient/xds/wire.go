package xds

import (
	"errors"
	"fmt"
	"iter"
	"strings"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	protov2 "google.golang.org/protobuf/proto"
)

// A response is not decoded into a DeltaDiscoveryResponse: istiod's first
// response carries the whole mesh (tens of megabytes for 100k workloads),
// and a decoded copy of it (every resource, its name, version and body
// copied out of the message) would sit in memory next to the message and
// next to the state converted from it. Instead the client keeps the bytes
// gRPC received, reads the envelope (type, nonce, removals), and hands the
// resources to the handler one at a time, straight from those bytes,
// releasing the message's buffers as the iteration passes them.

// rawResponse is a DeltaDiscoveryResponse as it arrived: the received
// buffers, owned by whoever holds the rawResponse until released.
type rawResponse struct{ data mem.BufferSlice }

// codec is gRPC's proto codec, except that it hands a *rawResponse the
// received buffers instead of decoding them.
type codec struct{ encoding.CodecV2 }

func newCodec() codec { return codec{encoding.GetCodecV2(proto.Name)} }

func (c codec) Unmarshal(data mem.BufferSlice, v any) error {
	if r, ok := v.(*rawResponse); ok {
		data.Ref() // gRPC frees its reference when this returns
		r.data = data
		return nil
	}
	return c.CodecV2.Unmarshal(data, v)
}

// Resource is one resource of a response.
type Resource struct {
	Name string
	// TypeURL is the type of Body (the type URL of the resource's Any).
	TypeURL string
	// Body is the serialized resource. It points into the received message
	// and is valid only until the iteration moves to the next resource.
	Body []byte
}

// UnmarshalTo decodes the resource into m, which must be of its type.
func (r *Resource) UnmarshalTo(m protov2.Message) error {
	want := m.ProtoReflect().Descriptor().FullName()
	if i := strings.LastIndexByte(r.TypeURL, '/'); r.TypeURL[i+1:] != string(want) {
		return fmt.Errorf("resource of type %q, want %s", r.TypeURL, want)
	}
	return protov2.Unmarshal(r.Body, m)
}

// Resources are the resources of one response, read one at a time from the
// message as it arrived. The message's buffers are released as the
// iteration passes them.
type Resources struct {
	msg   *rope
	n     int
	onRes func(name string, version []byte)
	onBad func(Rejection)
}

// Len is the number of resources in the response.
func (rs *Resources) Len() int { return rs.n }

// All yields the resources in order, once: ranging over All a second time
// yields nothing. A resource whose envelope is malformed is not yielded
// (the client rejects it by itself).
func (rs *Resources) All() iter.Seq[Resource] {
	return func(yield func(Resource) bool) {
		m := rs.msg
		if m == nil {
			return
		}
		defer rs.release()
		var scratch []byte
		var typeURL string // the previous resource's: one string for all of them, usually
		index := 0
		for !m.done() {
			num, typ, err := m.tag()
			if err != nil {
				return // checked by readEnvelope: cannot happen
			}
			if num != 2 || typ != protowire.BytesType {
				if m.skip(typ) != nil {
					return
				}
				continue
			}
			var b []byte
			if b, scratch, err = m.bytes(scratch); err != nil {
				return
			}
			name, version, t, body, err := parseResource(b)
			switch {
			case err != nil:
				rs.onBad(Rejection{Name: resourceLabel(name, index), Reason: fmt.Errorf("malformed resource: %w", err)})
			case name == "":
				rs.onBad(Rejection{Name: resourceLabel(name, index), Reason: errors.New("resource without a name")})
			default:
				if string(t) != typeURL {
					typeURL = string(t)
				}
				rs.onRes(name, version)
				if !yield(Resource{Name: name, TypeURL: typeURL, Body: body}) {
					return
				}
			}
			index++
			m.releaseRead()
		}
	}
}

func (rs *Resources) release() {
	if rs.msg != nil {
		rs.msg.free()
		rs.msg = nil
	}
}

func resourceLabel(name string, i int) string {
	if name != "" {
		return name
	}
	return fmt.Sprintf("resource #%d", i)
}

// parseResource reads the fields of an envoy.service.discovery.v3.Resource
// the client uses: name (3), version (1) and the resource's Any (2). The
// name is copied; version, type URL and body point into b.
func parseResource(b []byte) (name string, version, typeURL, body []byte, err error) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return name, nil, nil, nil, protowire.ParseError(n)
		}
		b = b[n:]
		if typ != protowire.BytesType {
			if n = protowire.ConsumeFieldValue(num, typ, b); n < 0 {
				return name, nil, nil, nil, protowire.ParseError(n)
			}
			b = b[n:]
			continue
		}
		v, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return name, nil, nil, nil, protowire.ParseError(n)
		}
		b = b[n:]
		switch num {
		case 3:
			name = string(v)
		case 1:
			version = v
		case 2:
			if typeURL, body, err = parseAny(v); err != nil {
				return name, nil, nil, nil, err
			}
		}
	}
	return name, version, typeURL, body, nil
}

// parseAny reads a google.protobuf.Any: type_url (1) and value (2).
func parseAny(b []byte) (typeURL, value []byte, err error) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, nil, protowire.ParseError(n)
		}
		b = b[n:]
		if typ != protowire.BytesType {
			if n = protowire.ConsumeFieldValue(num, typ, b); n < 0 {
				return nil, nil, protowire.ParseError(n)
			}
			b = b[n:]
			continue
		}
		v, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return nil, nil, protowire.ParseError(n)
		}
		b = b[n:]
		switch num {
		case 1:
			typeURL = v
		case 2:
			value = v
		}
	}
	return typeURL, value, nil
}

// envelope is what the client needs of a response before its resources.
type envelope struct {
	typeURL, nonce string
	removed        []string
	resources      int
	size           int
}

// readEnvelope reads the fields of a DeltaDiscoveryResponse around its
// resources (which istiod writes first, before the type URL), counting the
// resources, and checks the message's structure, so that the iteration
// over the resources cannot fail half way. It leaves m at the start.
func readEnvelope(m *rope) (envelope, error) {
	e := envelope{size: m.size}
	var scratch []byte
	for !m.done() {
		num, typ, err := m.tag()
		if err != nil {
			return e, err
		}
		if typ != protowire.BytesType {
			if err := m.skip(typ); err != nil {
				return e, err
			}
			continue
		}
		switch num {
		case 2:
			e.resources++
			err = m.skip(typ)
		case 4, 5, 6:
			var b []byte
			if b, scratch, err = m.bytes(scratch); err == nil {
				switch num {
				case 4:
					e.typeURL = string(b)
				case 5:
					e.nonce = string(b)
				case 6:
					e.removed = append(e.removed, string(b))
				}
			}
		default:
			err = m.skip(typ)
		}
		if err != nil {
			return e, err
		}
	}
	m.rewind()
	return e, nil
}

// rope reads a protobuf message that lies in several buffers (gRPC's
// receive buffers, one per HTTP/2 data frame or so) without joining them.
type rope struct {
	data mem.BufferSlice
	bufs [][]byte
	i    int // current buffer
	off  int // offset in it
	size int
	// freed: buffers before this one were released (releaseRead).
	freed int
}

func newRope(data mem.BufferSlice) *rope {
	r := &rope{data: data, bufs: make([][]byte, len(data)), size: data.Len()}
	for i, b := range data {
		r.bufs[i] = b.ReadOnlyData()
	}
	r.skipEmpty()
	return r
}

func (r *rope) skipEmpty() {
	for r.i < len(r.bufs) && r.off == len(r.bufs[r.i]) {
		r.i++
		r.off = 0
	}
}

func (r *rope) done() bool { return r.i >= len(r.bufs) }

func (r *rope) rewind() {
	if r.freed > 0 {
		panic("xds: rewinding a partly released message")
	}
	r.i, r.off = 0, 0
	r.skipEmpty()
}

var errTruncated = errors.New("truncated message")

func (r *rope) byte() (byte, error) {
	if r.done() {
		return 0, errTruncated
	}
	c := r.bufs[r.i][r.off]
	r.off++
	r.skipEmpty()
	return c, nil
}

func (r *rope) varint() (uint64, error) {
	var v uint64
	for shift := uint(0); shift < 64; shift += 7 {
		c, err := r.byte()
		if err != nil {
			return 0, err
		}
		v |= uint64(c&0x7f) << shift
		if c < 0x80 {
			return v, nil
		}
	}
	return 0, errors.New("varint overflow")
}

func (r *rope) tag() (protowire.Number, protowire.Type, error) {
	v, err := r.varint()
	if err != nil {
		return 0, 0, err
	}
	num, typ := protowire.DecodeTag(v)
	if num < protowire.MinValidNumber {
		return 0, 0, errors.New("invalid field number")
	}
	return num, typ, nil
}

// advance moves n bytes ahead, appending them to dst when keep.
func (r *rope) advance(n int, dst []byte, keep bool) ([]byte, error) {
	for n > 0 {
		if r.done() {
			return dst, errTruncated
		}
		k := min(n, len(r.bufs[r.i])-r.off)
		if keep {
			dst = append(dst, r.bufs[r.i][r.off:r.off+k]...)
		}
		r.off += k
		n -= k
		r.skipEmpty()
	}
	return dst, nil
}

// bytes reads a length-delimited field's contents: a slice of the current
// buffer when the field lies in it, else a copy in scratch (returned for
// reuse).
func (r *rope) bytes(scratch []byte) (b, _ []byte, err error) {
	l, err := r.varint()
	if err != nil {
		return nil, scratch, err
	}
	if l > uint64(r.size) {
		return nil, scratch, errTruncated
	}
	n := int(l)
	if !r.done() && len(r.bufs[r.i])-r.off >= n {
		b = r.bufs[r.i][r.off : r.off+n]
		r.off += n
		r.skipEmpty()
		return b, scratch, nil
	}
	scratch, err = r.advance(n, scratch[:0], true)
	return scratch, scratch, err
}

func (r *rope) skip(typ protowire.Type) error {
	switch typ {
	case protowire.VarintType:
		_, err := r.varint()
		return err
	case protowire.Fixed32Type:
		_, err := r.advance(4, nil, false)
		return err
	case protowire.Fixed64Type:
		_, err := r.advance(8, nil, false)
		return err
	case protowire.BytesType:
		l, err := r.varint()
		if err != nil {
			return err
		}
		if l > uint64(r.size) {
			return errTruncated
		}
		_, err = r.advance(int(l), nil, false)
		return err
	}
	return fmt.Errorf("unsupported wire type %d", typ)
}

// releaseRead releases the buffers read completely: nothing points into
// them once the resource that ended in them was handled.
func (r *rope) releaseRead() {
	for ; r.freed < r.i && r.freed < len(r.bufs); r.freed++ {
		r.data[r.freed].Free()
		r.data[r.freed], r.bufs[r.freed] = nil, nil
	}
}

func (r *rope) free() {
	for ; r.freed < len(r.bufs); r.freed++ {
		r.data[r.freed].Free()
		r.data[r.freed], r.bufs[r.freed] = nil, nil
	}
}
