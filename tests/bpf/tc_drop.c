// The lab's stand-in for an eBPF CNI's policy enforcement (Cilium attaches its programs
// the same way): attached at tc ingress of a pod's host-side veth, which is the pod's
// egress, it drops IPv4 TCP packets to DROP_ADDR:DROP_PORT (given with -D, in host byte
// order) and passes everything else. The kernel frees a packet a tc program dropped with
// drop reason TC_INGRESS.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>

#define SEC(name) __attribute__((section(name), used))

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define BE16(x) __builtin_bswap16(x)
#define BE32(x) __builtin_bswap32(x)
#else
#define BE16(x) (x)
#define BE32(x) (x)
#endif

SEC("tc")
int drop_flow(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != BE16(ETH_P_IP))
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP ||
	    ip->daddr != BE32(DROP_ADDR))
		return TC_ACT_OK;
	struct tcphdr *tcp = (void *)ip + ip->ihl * 4;
	if ((void *)(tcp + 1) > end)
		return TC_ACT_OK;
	return tcp->dest == BE16(DROP_PORT) ? TC_ACT_SHOT : TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
