package tundev

import (
	"encoding/binary"
	"testing"

	"golang.org/x/sys/unix"
)

// FuzzParseReplies feeds arbitrary bytes to the rtnetlink reply parsers: a clear error, never a
// panic.
func FuzzParseReplies(f *testing.F) {
	link := ifinfo(7, unix.IFF_UP, 0)
	link = append(link, attr(unix.IFLA_IFNAME, []byte("ute0\x00"))...)
	data := append(attr(unix.IFLA_TUN_PERSIST, []byte{1}), attr(unix.IFLA_TUN_NUM_QUEUES, u32(0))...)
	info := append(attr(unix.IFLA_INFO_KIND, []byte("tun\x00")), attr(unix.IFLA_INFO_DATA, data)...)
	link = append(link, attr(unix.IFLA_LINKINFO, info)...)
	hdr := make([]byte, unix.NLMSG_HDRLEN)
	binary.NativeEndian.PutUint32(hdr, uint32(unix.NLMSG_HDRLEN+len(link)))
	binary.NativeEndian.PutUint16(hdr[4:], unix.RTM_NEWLINK)
	f.Add(append(hdr, link...))
	f.Add(link)
	f.Add([]byte{})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		msgs, err := splitMessages(b)
		if err == nil {
			for _, m := range msgs {
				_, _ = parseLink(m.data)
			}
		}
		li, err := parseLink(b)
		if err == nil && li.kind != "tun" && (li.persist || li.hasQueues) {
			t.Fatalf("tun data decoded for kind %q", li.kind)
		}
	})
}

func TestParseLinkReadsTUNData(t *testing.T) {
	link := ifinfo(7, unix.IFF_UP, 0)
	link = append(link, attr(unix.IFLA_IFNAME, []byte("ute0\x00"))...)
	data := append(attr(unix.IFLA_TUN_PERSIST, []byte{1}), attr(unix.IFLA_TUN_NUM_QUEUES, u32(2))...)
	info := append(attr(unix.IFLA_INFO_KIND, []byte("tun\x00")), attr(unix.IFLA_INFO_DATA|unix.NLA_F_NESTED, data)...)
	link = append(link, attr(unix.IFLA_LINKINFO|unix.NLA_F_NESTED, info)...)
	li, err := parseLink(link)
	if err != nil {
		t.Fatal(err)
	}
	if li.index != 7 || li.name != "ute0" || li.kind != "tun" || !li.persist || !li.hasQueues || li.queues != 2 {
		t.Fatalf("parsed %+v", li)
	}
	if _, err := parseLink(link[:3]); err == nil {
		t.Fatal("short message accepted")
	}
	bad := append([]byte(nil), link...)
	binary.NativeEndian.PutUint16(bad[unix.SizeofIfInfomsg:], 0xfff0)
	if _, err := parseLink(bad); err == nil {
		t.Fatal("attribute longer than the message accepted")
	}
}
