/* SPDX-License-Identifier: Apache-2.0
 *
 * driftwarden quarantine: cgroup BPF programs that cut a container off the network while it
 * keeps running (for forensics). Attached to the container's cgroup v2 directory by
 * agent/actions.py, with BPF_F_ALLOW_MULTI so programs of others stay in force.
 *
 *   dw_q_connect4 / dw_q_connect6   cgroup/connect4, cgroup/connect6: connect() fails with EPERM
 *   dw_q_egress / dw_q_ingress      cgroup_skb egress / ingress: every packet is dropped
 *
 * The names are how a restarted agent recognises its own programs (BPF_PROG_QUERY on the
 * cgroup -> program ids -> program info -> name), so they must keep the `dw_q_` prefix and stay
 * under 16 bytes (BPF_OBJ_NAME_LEN). No maps, no state: the attachment itself is the state.
 */
#include <uapi/linux/bpf.h>

int dw_q_connect4(struct bpf_sock_addr *ctx)
{
    return 0;  /* reject: connect() returns -EPERM */
}

int dw_q_connect6(struct bpf_sock_addr *ctx)
{
    return 0;
}

int dw_q_egress(struct __sk_buff *skb)
{
    return 0;  /* drop; a local sender sees -EPERM */
}

int dw_q_ingress(struct __sk_buff *skb)
{
    return 0;
}
