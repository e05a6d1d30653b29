package tunnel

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// BenchmarkFlowCopySize: one admitted stream flow over loopback, written and read in calls of
// the given size, as the TUN carriage's splice does with its copy buffer. Reports the process's
// CPU time (both ends) per GB carried, which depends less on the machine's load than MB/s.
func BenchmarkFlowCopySize(b *testing.B) {
	for _, size := range []int{32 << 10, 64 << 10, 256 << 10, 1 << 20} {
		b.Run(fmt.Sprintf("size=%dK", size>>10), func(b *testing.B) {
			_, srv, tun := pair(b, "payments")
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			got := make(chan int64, 1)
			go func() {
				select {
				case c := <-srv.streams:
					buf := make([]byte, size)
					var n int64
					for {
						k, err := c.Read(buf)
						n += int64(k)
						if err != nil {
							break
						}
					}
					_ = c.Close()
					got <- n
				case <-ctx.Done():
				}
			}()
			flow, err := tun.OpenFlow(ctx, rec(b, testRecord{Agent: "bench"}), nil, nil)
			require.NoError(b, err)
			buf := make([]byte, size)
			b.SetBytes(int64(size))
			b.ResetTimer()
			cpu0 := procCPU()
			for range b.N {
				if _, err := flow.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			require.NoError(b, flow.CloseWrite())
			select {
			case n := <-got:
				require.Equal(b, int64(b.N*size), n)
			case <-time.After(30 * time.Second):
				b.Fatal("the reader did not finish")
			}
			cpu := procCPU() - cpu0
			b.StopTimer()
			_ = flow.Close()
			b.ReportMetric(float64(cpu.Milliseconds())/(float64(b.N*size)/1e9), "cpu-ms/GB")
		})
	}
}

func procCPU() time.Duration {
	var ru unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
