/* SPDX-License-Identifier: Apache-2.0
 *
 * driftwarden probes: exec, connect and file writes from every container.
 *
 * Only tracepoints, helpers and user-memory reads: no kernel struct is ever dereferenced,
 * so the program is correct with any kernel headers (see docs/host-setup.md).
 *
 * Cost model, cheapest check first:
 *   kind compiled in (an unselected kind has no tracepoint at all) -> write intent (opens) -> skipped cgroup / agent tgid
 *   -> stash args -> at syscall exit: read paths -> dedup (LRU) -> the container's budget for
 *   the kind (LRU, one lookup) -> ring buffer, no wake-up.
 * Everything not sent is counted in `counters` (per CPU, per kind); what a budget held back and
 * what the ring buffer had no room for also per (cgroup, kind) in `budget`.
 *
 * Settings are -D defines (probes/loader.py ProbeConfig), never spliced text; so is what the
 * kernel offers (DW_HAVE_*: a syscall this kernel lacks is not compiled, so not attached).
 */
#include <uapi/linux/ptrace.h>
#include "dw_event.h"

#ifndef DW_RINGBUF_PAGES
#define DW_RINGBUF_PAGES 1024               /* 4 MiB */
#endif
#ifndef DW_DEDUP_NS
#define DW_DEDUP_NS 1000000000              /* repeats within 1 s are suppressed; 0 disables */
#endif
#ifndef DW_DEDUP_ENTRIES
#define DW_DEDUP_ENTRIES 16384
#endif
#ifndef DW_INCLUDE_HOST
#define DW_INCLUDE_HOST 0                   /* 1: report host cgroups too */
#endif
/* Per-container budgets (fairness under floods): what one cgroup may send of a kind once dedup
 * let it through, as a token bucket: RATE events/s sustained, BURST at once; RATE 0 = no
 * budget for that kind (and no lookup). The excess is counted per (cgroup, kind) in `budget`
 * and not sent, so one container cannot fill the ring buffer for the others. An exec held back
 * still sends its compact dw_exec_repeat_event (the process table must know what runs). Fork,
 * exit and chdir (bookkeeping) have no budget: the process table and relative paths need
 * every one. probes/loader.py ProbeConfig.budgets sets these. */
#ifndef DW_BUDGET_EXEC_RATE
#define DW_BUDGET_EXEC_RATE 1000
#endif
#ifndef DW_BUDGET_EXEC_BURST
#define DW_BUDGET_EXEC_BURST 2000
#endif
#ifndef DW_BUDGET_CONNECT_RATE
#define DW_BUDGET_CONNECT_RATE 2000
#endif
#ifndef DW_BUDGET_CONNECT_BURST
#define DW_BUDGET_CONNECT_BURST 4000
#endif
#ifndef DW_BUDGET_FILE_RATE
#define DW_BUDGET_FILE_RATE 5000
#endif
#ifndef DW_BUDGET_FILE_BURST
#define DW_BUDGET_FILE_BURST 10000
#endif
#ifndef DW_BUDGET_ENTRIES
#define DW_BUDGET_ENTRIES 16384             /* (cgroup, kind) pairs tracked; LRU */
#endif
#ifndef DW_KNOWN_ENTRIES
#define DW_KNOWN_ENTRIES 0                  /* (cgroup, kind, identity) entries of the baseline
                                             * filter; 0: no filter (trace, learning) */
#endif
#if DW_BUDGET_EXEC_BURST < 1 || DW_BUDGET_CONNECT_BURST < 1 || DW_BUDGET_FILE_BURST < 1
#error "DW_BUDGET_*_BURST must be >= 1"
#endif
#ifndef DW_HOST_CGROUP_ID
#define DW_HOST_CGROUP_ID 1                 /* the cgroup v2 root's id; the loader sets it */
#endif
#ifndef DW_AGENT_TGID
#define DW_AGENT_TGID 0                     /* the agent's pid, never reported; the loader sets it */
#endif
#ifndef DW_EXTRA_SKIP
#define DW_EXTRA_SKIP 0                     /* 1: also skip what skip_cgroups/skip_tgids hold */
#endif
#ifndef DW_OPEN_RESULT
#define DW_OPEN_RESULT 0                    /* 1: report opens at exit, with their result */
#endif
/* Opens are reported at entry by default: sys_exit_openat would fire for every open on the
 * host, read-only ones included, and a write-open would pay two tracepoints and a stash. */

/* Which kinds are compiled in, 1 or 0 each: an unselected kind's tracepoints are not attached
 * (probes/loader.py KIND_TRACEPOINTS lists them). Bookkeeping (fork, exit, clone, chdir) always
 * is: process identity, parents and relative paths need it. */
#ifndef DW_WITH_EXEC
#define DW_WITH_EXEC 1
#endif
#ifndef DW_WITH_CONNECT
#define DW_WITH_CONNECT 1
#endif
#ifndef DW_WITH_FILE
#define DW_WITH_FILE 1
#endif
#ifndef DW_WAKEUP
#define DW_WAKEUP BPF_RB_NO_WAKEUP          /* userspace drains on a timer */
#endif
#ifndef DW_WAKE_KINDS
#define DW_WAKE_KINDS 0                     /* kinds (a bit each) that wake the reader at once:
                                             * execs are rare next to writes, and an exec is
                                             * what drift alerts are about */
#endif
#ifndef DW_WAKE_GAP_NS
#define DW_WAKE_GAP_NS 5000000              /* such a wake-up only this long after the last:
                                             * a storm of execs costs no wake-up each; the
                                             * reader polls sooner while execs arrive */
#endif
/* Syscalls a supported kernel may lack (probes/loader.py OPTIONAL_SYSCALLS says which and why),
 * 1 or 0 each: the loader reads tracefs, and one the kernel lacks is neither compiled nor
 * attached (a kernel without a syscall runs no process that calls it). */
#ifndef DW_HAVE_OPEN
#define DW_HAVE_OPEN 1
#endif
#ifndef DW_HAVE_CREAT
#define DW_HAVE_CREAT 1
#endif
#ifndef DW_HAVE_OPENAT2
#define DW_HAVE_OPENAT2 1
#endif
#ifndef DW_HAVE_RENAME
#define DW_HAVE_RENAME 1
#endif
#ifndef DW_HAVE_RENAMEAT
#define DW_HAVE_RENAMEAT 1
#endif
#ifndef DW_HAVE_UNLINK
#define DW_HAVE_UNLINK 1
#endif
#ifndef DW_HAVE_RMDIR
#define DW_HAVE_RMDIR 1
#endif
#ifndef DW_HAVE_CHMOD
#define DW_HAVE_CHMOD 1
#endif
#ifndef DW_HAVE_FCHMODAT2
#define DW_HAVE_FCHMODAT2 1
#endif
#ifndef DW_HAVE_LINK
#define DW_HAVE_LINK 1
#endif
#ifndef DW_HAVE_SYMLINK
#define DW_HAVE_SYMLINK 1
#endif
#ifndef DW_HAVE_MKDIR
#define DW_HAVE_MKDIR 1
#endif
#ifndef DW_HAVE_MKNOD
#define DW_HAVE_MKNOD 1
#endif

/* Keeps clang from re-deriving a clamped length from its unclamped source, which the
 * verifier would then reject as unbounded. */
#define DW_BARRIER(var) asm volatile("" : "+r"(var))

#define DW_O_ACCMODE 00000003
#define DW_O_CREAT   00000100
#define DW_O_TRUNC   00001000
#define DW_O_APPEND  00002000
#define DW_O_WRONLY  00000001
#define DW_AT_REMOVEDIR 0x200
#define DW_AF_UNIX  1
#define DW_AF_INET  2
#define DW_AF_INET6 10
#define DW_CLONE_THREAD 0x00010000

/* Syscall arguments stashed at sys_enter_* and consumed at sys_exit_*. */
struct dw_pending {
    u64 path;                    /* user pointer */
    u64 path2;                   /* user pointer, second path (rename, link, symlink) */
    s32 dirfd;
    s32 dirfd2;
    u32 flags;
    u32 mode;
    u16 kind;                    /* enum dw_kind */
    u16 op;                      /* enum dw_file_op; connect: 1 socket(), 2 connect() */
    u32 _pad;
};

struct dw_dedup_key {
    u64 cgroup_id;
    u64 hash;
    u32 kind;
    u32 _pad;
};

struct dw_dedup_val {
    u64 last_ns;
    u32 suppressed;
    u32 _pad;
};

struct dw_budget_key {
    u64 cgroup_id;
    u32 kind;
    u32 _pad;
};

struct dw_budget_val {
    u64 tat;                     /* GCRA: the bucket holds BURST tokens at tat - (BURST-1)/RATE */
    u64 over;                    /* events the budget held back */
    u64 dropped;                 /* events admitted that the ring buffer had no room for */
};

struct dw_sock_key {
    u32 tgid;
    s32 fd;
};

/* What the kernel told us about a process: its start and its parent's (at its fork), what it
 * runs and its working directory's bookkeeping. One record per process, so a fork, an exit or
 * an event touches one map entry, not one per fact. */
struct dw_proc {
    u64 start_ns;                /* bpf_ktime_get_boot_ns() at its fork; 0 = fork not seen */
    u64 parent_start_ns;         /* the parent's start_ns when the parent's fork was seen, else 0 */
    u32 ppid;                    /* the tgid that forked it; 0 = unknown */
    u32 cwd_epoch;               /* chdirs it made: a relative path's identity holds it */
    u64 program;                 /* what it runs: its last exec's key (chained through
                                  * /proc/... re-execs), inherited at fork; 0 = unknown */
    u32 cwd_owner;               /* the process whose cwd it still shares: itself after a chdir,
                                  * else inherited at fork (an httpd connection child that exits
                                  * at once leaves its CGI child's base known); 0 = unknown */
    u8 cwd_lost;                 /* 1 while a chdir of it was not sent (over its container's
                                  * chdir budget, or dropped): its next sent event says so
                                  * (DW_F_CWD_LOST) and userspace reads the cwd again */
    u8 fork_unsent;              /* 1 while userspace has not heard of it: its fork was not
                                  * sent (over its container's fork budget, or dropped). Its
                                  * next sent event says so (DW_F_FORK_UNSENT) and it inherits
                                  * its parent's program and cwd then; its exit is not sent */
    u8 _pad[2];
};

/* An identity the container's baseline holds (userspace puts it there after judging one
 * event of it known): its events are counted here, not sent. */
struct dw_known_val {
    u64 last_ns;                 /* the last one counted as a hit */
    u64 hits;                    /* events that dedup would have let through (userspace adds
                                  * them to the container's feature windows) */
};

BPF_RINGBUF_OUTPUT(events, DW_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(counters, u64, DW_KIND_MAX * DW_CNT_MAX);
BPF_HASH(skip_cgroups, u64, u8, 64);                       /* more host cgroups (DW_EXTRA_SKIP) */
BPF_HASH(skip_tgids, u32, u8, 64);                         /* more processes never reported */
/* LRU maps with per-CPU free lists: no global LRU lock on the hot path. */
/* tgid -> its record, made at every fork on the host (a container's init is forked by the
 * runtime outside the container's cgroup), or at its first exec or chdir seen when it began
 * before the probes; removed when the process exits */
BPF_F_TABLE("lru_hash", u32, struct dw_proc, proc_of, 65536, BPF_F_NO_COMMON_LRU);
BPF_F_TABLE("lru_hash", struct dw_dedup_key, struct dw_dedup_val, dedup, DW_DEDUP_ENTRIES,
            BPF_F_NO_COMMON_LRU);
BPF_F_TABLE("lru_hash", struct dw_sock_key, u16, sock_types, 65536, BPF_F_NO_COMMON_LRU);
/* (cgroup, kind) -> its token bucket and what it held back and lost; read by userspace, never
 * deleted there: entries made (budget_made) minus entries present = entries evicted */
BPF_F_TABLE("lru_hash", struct dw_budget_key, struct dw_budget_val, budget, DW_BUDGET_ENTRIES,
            BPF_F_NO_COMMON_LRU);
BPF_PERCPU_ARRAY(budget_made, u64, 1);
BPF_ARRAY(last_wake, u64, 1);                              /* DW_WAKE_GAP_NS */
#if DW_KNOWN_ENTRIES
/* a plain hash, not an LRU: userspace owns every entry (a full map refuses, counted there) */
BPF_HASH(known, struct dw_dedup_key, struct dw_known_val, DW_KNOWN_ENTRIES);
#endif
/* Per-thread syscall stash, tid -> the arguments of its syscall in flight (kind 0: none). A
 * thread keeps its entry and overwrites it in place (a lookup, no map update or delete per
 * syscall); it goes when the thread exits, and an LRU map lets the least used go first when
 * more threads than this ever stashed. */
BPF_F_TABLE("lru_hash", u32, struct dw_pending, pending, 16384, 0);
BPF_HASH(exec_pending, u32, struct dw_exec_event, 1024);   /* tid -> its exec in flight */
/* tgid -> the thread (not the leader) in execve: a successful exec gives that thread the tgid as
 * its pid and ends the leader, which is then not the process ending */
BPF_HASH(exec_threads, u32, u32, 1024);
BPF_PERCPU_ARRAY(exec_scratch, struct dw_exec_event, 1);
BPF_PERCPU_ARRAY(file_scratch, struct dw_file_event, 1);
BPF_PERCPU_ARRAY(connect_scratch, struct dw_connect_event, 1);
BPF_PERCPU_ARRAY(chdir_scratch, struct dw_chdir_event, 1);

static __always_inline void dw_count(u32 kind, u32 which)
{
    u32 idx = kind * DW_CNT_MAX + which;
    u64 *v = counters.lookup(&idx);
    if (v)
        (*v)++;
}

/* True when this task's events are not wanted: host cgroup or the agent itself. */
static __always_inline int dw_skipped(u64 cgid, u64 pid_tgid)
{
#if !DW_INCLUDE_HOST
    if (cgid == DW_HOST_CGROUP_ID)
        return 1;
#if DW_EXTRA_SKIP
    if (skip_cgroups.lookup(&cgid))
        return 1;
#endif
#endif
    u32 tgid = pid_tgid >> 32;
    if (tgid == DW_AGENT_TGID)
        return 1;
#if DW_EXTRA_SKIP
    return skip_tgids.lookup(&tgid) != 0;
#else
    return 0;
#endif
}

/* Everything but flags and suppressed, which callers set as they learn them; `proc` is the
 * process's record (NULL: none). Called only for events that will be sent: dedup is decided
 * first, so a suppressed repeat never pays this. */
static __always_inline void dw_fill_header(struct dw_event_header *h, u16 kind, u64 cgid,
                                           u64 pid_tgid, u64 now, const struct dw_proc *proc)
{
    h->ts_ns = now;
    h->cgroup_id = cgid;
    h->kind = kind;
    h->pid = (u32)pid_tgid;
    h->tgid = pid_tgid >> 32;
    if (proc) {
        h->ppid = proc->ppid;
        h->start_ns = proc->start_ns;
        h->parent_start_ns = proc->parent_start_ns;
    } else {
        h->ppid = 0;
        h->start_ns = 0;
        h->parent_start_ns = 0;
    }
    u64 ugid = bpf_get_current_uid_gid();
    h->uid = (u32)ugid;
    h->gid = ugid >> 32;
    h->_pad = 0;
    bpf_get_current_comm(&h->comm, sizeof(h->comm));
}

#ifndef DW_HASH_SEED
#define DW_HASH_SEED 0xcbf29ce484222325ULL  /* the loader sets a random one per load */
#endif
#define DW_FNV_BASIS ((u64)(DW_HASH_SEED))
#define DW_MIX_MULTIPLIER 0xff51afd7ed558ccdULL

/* One step of the identity hashes (dedup keys, known keys, budgets): a dense odd multiplier
 * and a shift that carries the high bits down again, so a difference anywhere in a word
 * reaches every bit of the result (FNV's sparse prime left a difference in a word's top byte
 * in the top byte: "/tmp/a13" and "/tmp/a19" collided). The seed is random per load and
 * secret from containers, so a path cannot be chosen to collide with a known one. */
static __always_inline u64 dw_mix(u64 h, u64 v)
{
    h ^= v;
    h *= DW_MIX_MULTIPLIER;
    return h ^ (h >> 32);
}

/* The mix over 8-byte words of a NUL-terminated buffer of `len` bytes (NUL included), at most
 * `max_words` words: a constant at every call, so the verifier sees a bounded loop. Bytes past
 * `len` are stale scratch memory, so the last word is masked. */
static __always_inline u64 dw_hash_words(const char *buf, u32 len, const u32 max_words, u64 h)
{
    for (int i = 0; i < max_words; i++) {
        u32 off = i * 8;
        if (off >= len)
            break;
        u64 w = *(const u64 *)(buf + off);
        u32 left = len - off;
        if (left < 8)
            w &= (1ULL << (left * 8)) - 1;
        h = dw_mix(h, w);
    }
    return h;
}

static __always_inline u64 dw_hash_path(const char *buf, u32 len, u64 h)
{
    return dw_hash_words(buf, len, DW_PATH_MAX / 8, h);
}

static __always_inline u64 dw_hash_args(const char *buf, u32 len, u64 h)
{
    return dw_hash_words(buf, len, DW_ARGS_SIZE / 8, h);
}

#define DW_NS_PER(rate) ((rate) ? 1000000000ULL / (rate) : 0ULL)

/* Nanoseconds per token and the burst of a kind's budget; constants at every inlined call. */
static __always_inline u64 dw_budget_interval(u32 kind)
{
    if (kind == DW_KIND_EXEC)
        return DW_NS_PER(DW_BUDGET_EXEC_RATE);
    if (kind == DW_KIND_CONNECT)
        return DW_NS_PER(DW_BUDGET_CONNECT_RATE);
    if (kind == DW_KIND_FILE)
        return DW_NS_PER(DW_BUDGET_FILE_RATE);
    if (kind == DW_KIND_CHDIR)
        return DW_NS_PER(DW_BUDGET_CHDIR_RATE);
    if (kind == DW_KIND_FORK)
        return DW_NS_PER(DW_BUDGET_FORK_RATE);
    return 0;
}

static __always_inline u64 dw_budget_burst(u32 kind)
{
    if (kind == DW_KIND_EXEC)
        return DW_BUDGET_EXEC_BURST;
    if (kind == DW_KIND_CONNECT)
        return DW_BUDGET_CONNECT_BURST;
    if (kind == DW_KIND_CHDIR)
        return DW_BUDGET_CHDIR_BURST;
    if (kind == DW_KIND_FORK)
        return DW_BUDGET_FORK_BURST;
    return DW_BUDGET_FILE_BURST;
}

/* 1 when the cgroup has spent its budget for `kind` (counted, not to be sent); else 0 and a
 * token is taken. *slot receives the cgroup's entry (for drops), NULL when the kind has no
 * budget. A token bucket as GCRA: one timestamp, no division at run time. Two CPUs racing on
 * one entry may let an event or two more through: a budget, not an account. */
static __always_inline int dw_over_budget(u32 kind, u64 cgid, u64 now,
                                          struct dw_budget_val **slot)
{
    u64 interval = dw_budget_interval(kind);
    *slot = 0;
    if (interval == 0)
        return 0;
    struct dw_budget_key key = {.cgroup_id = cgid, .kind = kind};
    struct dw_budget_val *b = budget.lookup(&key);
    if (!b) {
        struct dw_budget_val fresh = {.tat = now + interval};
        if (budget.insert(&key, &fresh) == 0) {
            u32 zero = 0;
            u64 *made = budget_made.lookup(&zero);
            if (made)
                (*made)++;
        }
        *slot = budget.lookup(&key);     /* once per (cgroup, kind) */
        return 0;
    }
    *slot = b;
    u64 tat = b->tat;
    if (tat > now + (dw_budget_burst(kind) - 1) * interval) {
        __sync_fetch_and_add(&b->over, 1);
        dw_count(kind, DW_CNT_OVER_BUDGET);
        return 1;
    }
    b->tat = (tat > now ? tat : now) + interval;
    return 0;
}

#define DW_ADMITTED 0
#define DW_SUPPRESSED 1                     /* a repeat within DW_DEDUP_NS */
#define DW_OVER_BUDGET 2                    /* its container is over its budget for the kind */
#define DW_KNOWN 3                          /* its container's baseline holds it: counted */

/* Whether an event is sent. An identity (`known_key`, 0: none) the container's baseline
 * holds is counted in its `known` entry, as one hit when dedup would have let it through,
 * else as a suppressed repeat: never sent, no budget spent. Otherwise a repeat of a key sent
 * less than DW_DEDUP_NS ago is suppressed (counted); else the container's budget decides,
 * before any ring buffer space is taken. Only an admitted event updates the dedup entry
 * (*carried receives the repeats suppressed since the key was last sent), so what a budget
 * held back is sent when it comes again in budget. */
static __always_inline int dw_admit(u32 kind, u64 cgid, u64 hash, u64 known_key, u64 now,
                                    u32 *carried, struct dw_budget_val **slot)
{
#if DW_KNOWN_ENTRIES
    if (known_key) {
        struct dw_dedup_key kkey = {.cgroup_id = cgid, .hash = known_key, .kind = kind};
        struct dw_known_val *k = known.lookup(&kkey);
        if (k) {
            if (DW_DEDUP_NS != 0 && now - k->last_ns < DW_DEDUP_NS) {
                dw_count(kind, DW_CNT_SUPPRESSED);
                return DW_SUPPRESSED;
            }
            k->last_ns = now;
            __sync_fetch_and_add(&k->hits, 1);
            dw_count(kind, DW_CNT_KNOWN);
            return DW_KNOWN;
        }
    }
#endif
#if DW_DEDUP_NS != 0
    struct dw_dedup_key key = {.cgroup_id = cgid, .hash = hash, .kind = kind};
    struct dw_dedup_val *val = dedup.lookup(&key);
    if (val && now - val->last_ns < DW_DEDUP_NS) {
        __sync_fetch_and_add(&val->suppressed, 1);
        dw_count(kind, DW_CNT_SUPPRESSED);
        return DW_SUPPRESSED;
    }
#endif
    if (dw_over_budget(kind, cgid, now, slot))
        return DW_OVER_BUDGET;
#if DW_DEDUP_NS != 0
    if (val) {
        *carried = val->suppressed;
        val->suppressed = 0;
        val->last_ns = now;
    } else {
        struct dw_dedup_val fresh = {.last_ns = now};
        dedup.update(&key, &fresh);
    }
#endif
    return DW_ADMITTED;
}

/* A wake-up kind's flags: a forced wake-up, unless one was forced less than DW_WAKE_GAP_NS
 * ago (one global slot: CPUs racing on it may both wake, which is harmless). */
static __always_inline u64 dw_wake_flags(void)
{
#if DW_WAKE_GAP_NS != 0
    u32 zero = 0;
    u64 *last = last_wake.lookup(&zero);
    if (last) {
        u64 now = bpf_ktime_get_ns();
        if (now - *last < DW_WAKE_GAP_NS)
            return DW_WAKEUP;
        *last = now;
    }
#endif
    return BPF_RB_FORCE_WAKEUP;
}

/* `max` is the size of the object at `data`; `slot` the sender's budget entry, or NULL (its
 * drops are then counted per kind only). The clamp sits behind a barrier on a 64-bit value
 * so clang cannot hand the verifier an unclamped copy, whatever the -D settings. */
static __always_inline int dw_emit(void *data, u64 size, u64 max, u32 kind,
                                   struct dw_budget_val *slot)
{
    DW_BARRIER(size);
    if (size > max)
        size = max;
    /* forced: the default wake-up is skipped while earlier records (sent without one) wait */
    u64 flags = ((DW_WAKE_KINDS) & (1 << kind)) ? dw_wake_flags() : DW_WAKEUP;
    if (events.ringbuf_output(data, size, flags) == 0) {
        dw_count(kind, DW_CNT_EMITTED);
        return 1;
    }
    dw_count(kind, DW_CNT_DROPPED);
    if (slot)                               /* the container's entry: drops per container */
        __sync_fetch_and_add(&slot->dropped, 1);
    return 0;
}

/* The marks of a process that its next sent event must carry: DW_F_CWD_LOST (a chdir of it
 * was not sent: userspace reads its cwd again) and DW_F_FORK_UNSENT (its fork was not sent:
 * userspace gives it its parent's program and cwd). dw_proc_sent takes a mark off once an
 * event carrying it was sent. */
static __always_inline void dw_proc_flags(struct dw_event_header *hdr, const struct dw_proc *proc)
{
    if (!proc)
        return;
    if (proc->cwd_lost)
        hdr->flags |= DW_F_CWD_LOST;
    if (proc->fork_unsent)
        hdr->flags |= DW_F_FORK_UNSENT;
}

static __always_inline void dw_proc_sent(int sent, u16 flags, struct dw_proc *proc)
{
    if (!sent || !proc)
        return;
    if (flags & DW_F_CWD_LOST)
        proc->cwd_lost = 0;
    if (flags & DW_F_FORK_UNSENT)
        proc->fork_unsent = 0;
}

/* A relative path means something different after a chdir: key it on the process and
 * its chdir count so a repeat in another directory is never suppressed. */
static __always_inline u64 dw_hash_cwd(u64 h, const char *path, u32 tgid)
{
    if (path[0] == '/')
        return h;
    struct dw_proc *proc = proc_of.lookup(&tgid);
    return dw_mix(dw_mix(h, tgid), proc ? proc->cwd_epoch : 0);
}

/* ------------------------------------------------------------------ bookkeeping */

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    struct dw_pending *stash = pending.lookup(&tid);
    if (stash && stash->kind == DW_KIND_FORK)
        return 0;                         /* a thread: not a new process */
    u32 child = args->child_pid;
    u32 parent = pid_tgid >> 32;
    u64 cgid = bpf_get_current_cgroup_id();
    int skipped = dw_skipped(cgid, pid_tgid);
    struct dw_proc info = {.start_ns = bpf_ktime_get_boot_ns(), .ppid = parent};
    struct dw_proc *pinfo = proc_of.lookup(&parent);
    if (pinfo) {
        info.parent_start_ns = pinfo->start_ns;
        info.program = pinfo->program;    /* a fork runs what its parent ran */
    }
    if (!skipped) {
        info.cwd_owner = pinfo && pinfo->cwd_owner ? pinfo->cwd_owner : parent;
        info.cwd_lost = pinfo ? pinfo->cwd_lost : 0;   /* userspace gives the child its
                                                        * parent's cwd */
    }
    if (skipped) {
        proc_of.update(&child, &info);
        return 0;
    }
    /* bookkeeping, but one shell loop of subshells forks ~3,700 times a second: budgeted like
     * the other kinds, so one container cannot fill the ring buffer. A fork held back (never
     * deduplicated) costs userspace little: the child's first sent event carries
     * DW_F_FORK_UNSENT and the child inherits from its parent then */
    u64 now = bpf_ktime_get_ns();
    struct dw_budget_val *slot = 0;
    int sent = 0;
    if (!dw_over_budget(DW_KIND_FORK, cgid, now, &slot)) {
        struct dw_fork_event e = {};
        dw_fill_header(&e.hdr, DW_KIND_FORK, cgid, pid_tgid, now, pinfo);
        dw_proc_flags(&e.hdr, pinfo);
        e.child_start_ns = info.start_ns;
        e.child_tgid = child;
        sent = dw_emit(&e, sizeof(e), sizeof(e), DW_KIND_FORK, slot);
        dw_proc_sent(sent, e.hdr.flags, pinfo);
    }
    info.fork_unsent = !sent;
    proc_of.update(&child, &info);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = (u32)pid_tgid;
    u32 tgid = pid_tgid >> 32;
    pending.delete(&pid);                 /* whatever a killed syscall left behind */
    exec_pending.delete(&pid);
#if DW_WITH_EXEC
    u32 *execing = exec_threads.lookup(&tgid);
    if (execing) {
        if (*execing != pid)
            return 0;                     /* the leader (or another thread) ends: a thread execs */
        exec_threads.delete(&tgid);       /* the exec'ing thread itself was killed */
    }
#endif
    if (pid != tgid)
        return 0;                         /* a thread; the process lives on */
    u64 cgid = bpf_get_current_cgroup_id();
    struct dw_proc *proc = proc_of.lookup(&tgid);
    if (proc && proc->fork_unsent) {
        dw_count(DW_KIND_EXIT, DW_CNT_OVER_BUDGET);   /* userspace never heard of it */
    } else if (!dw_skipped(cgid, pid_tgid)) {
        struct dw_exit_event e = {};
        dw_fill_header(&e.hdr, DW_KIND_EXIT, cgid, pid_tgid, bpf_ktime_get_ns(), proc);
        dw_emit(&e, sizeof(e), sizeof(e), DW_KIND_EXIT, 0);   /* never deduplicated */
    }
    proc_of.delete(&tgid);
    return 0;
}

static __always_inline void dw_fill_pending(struct dw_pending *p, u16 kind, u16 op,
                                            const char *path, const char *path2, s32 dirfd,
                                            s32 dirfd2, u32 flags, u32 mode)
{
    p->path = (u64)path;
    p->path2 = (u64)path2;
    p->dirfd = dirfd;
    p->dirfd2 = dirfd2;
    p->flags = flags;
    p->mode = mode;
    p->kind = kind;
    p->op = op;
}

/* This thread's stash slot, made the first time it stashes; NULL when the map refused. Only
 * the thread itself writes its slot (and its exit removes it), so it is filled in place. */
static __always_inline struct dw_pending *dw_stash_slot(u32 tid)
{
    struct dw_pending *slot = pending.lookup(&tid);
    if (slot)
        return slot;
    struct dw_pending fresh = {};
    pending.update(&tid, &fresh);
    return pending.lookup(&tid);
}

static __always_inline int dw_stash(u16 kind, u16 op, const char *path, const char *path2,
                                    s32 dirfd, s32 dirfd2, u32 flags, u32 mode)
{
    u64 cgid = bpf_get_current_cgroup_id();
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (dw_skipped(cgid, pid_tgid))
        return 0;
    struct dw_pending *slot = dw_stash_slot((u32)pid_tgid);
    if (slot)
        dw_fill_pending(slot, kind, op, path, path2, dirfd, dirfd2, flags, mode);
    return 0;
}

/* Takes the stashed arguments of this thread's syscall if they are of `kind` (the slot is
 * then empty: kind 0). */
static __always_inline int dw_unstash(u16 kind, struct dw_pending *out)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct dw_pending *p = pending.lookup(&tid);
    if (!p)
        return 0;
    if (p->kind != kind)
        return 0;
    __builtin_memcpy(out, p, sizeof(*out));
    p->kind = 0;
    return 1;
}

/* ------------------------------------------------------------------ clone */

/* A thread is a clone with CLONE_THREAD: sys_enter_clone/clone3 stash that in `pending` (kind
 * DW_KIND_FORK) for sched_process_fork, and their exits drop it. Everything else that forks
 * (fork, vfork, clone without it) starts a process. */
static __always_inline int dw_clone_enter(u64 flags)
{
    if (!(flags & DW_CLONE_THREAD))
        return 0;                         /* a process: nothing to stash, the common case */
    struct dw_pending *slot = dw_stash_slot((u32)bpf_get_current_pid_tgid());
    if (slot)
        dw_fill_pending(slot, DW_KIND_FORK, 0, 0, 0, 0, 0, (u32)flags, 0);
    return 0;
}

static __always_inline int dw_clone_exit(void)
{
    struct dw_pending p;
    dw_unstash(DW_KIND_FORK, &p);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_clone) { return dw_clone_enter(args->clone_flags); }
TRACEPOINT_PROBE(syscalls, sys_exit_clone) { return dw_clone_exit(); }

TRACEPOINT_PROBE(syscalls, sys_enter_clone3)
{
    u64 flags = 0;                        /* struct clone_args starts with its u64 flags */
    if (bpf_probe_read_user(&flags, sizeof(flags), (const void *)args->uargs) < 0)
        return 0;
    return dw_clone_enter(flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_clone3) { return dw_clone_exit(); }

/* ------------------------------------------------------------------ chdir */

TRACEPOINT_PROBE(syscalls, sys_enter_chdir)
{
    return dw_stash(DW_KIND_CHDIR, 0, args->filename, 0, DW_AT_FDCWD, 0, 0, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_fchdir)
{
    return dw_stash(DW_KIND_CHDIR, 0, 0, 0, args->fd, 0, 0, 0);
}

static __always_inline int dw_chdir_exit(long ret)
{
    struct dw_pending p;
    if (!dw_unstash(DW_KIND_CHDIR, &p))
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    struct dw_proc *proc = proc_of.lookup(&tgid);
    if (!proc && ret == 0) {              /* began before the probes: its cwd changed now */
        struct dw_proc fresh = {};
        proc_of.update(&tgid, &fresh);
        proc = proc_of.lookup(&tgid);
    }
    u32 cwd_base = proc ? proc->cwd_owner : 0;
    if (ret == 0 && proc) {
        proc->cwd_owner = tgid;
        __sync_fetch_and_add(&proc->cwd_epoch, 1);
    }
    /* bookkeeping, but a shell loop of `cd` sends ~240K a second: budgeted like the other
     * kinds, so one container cannot fill the ring buffer; what it held back costs only
     * that process's cwd, which userspace then reads again (DW_F_CWD_LOST) */
    u64 cgid = bpf_get_current_cgroup_id();
    u64 now = bpf_ktime_get_ns();
    struct dw_budget_val *slot = 0;
    if (dw_over_budget(DW_KIND_CHDIR, cgid, now, &slot)) {
        if (ret == 0 && proc)
            proc->cwd_lost = 1;
        return 0;
    }
    u32 zero = 0;
    struct dw_chdir_event *e = chdir_scratch.lookup(&zero);
    if (!e)
        return 0;
    e->hdr.flags = 0;
    e->hdr.suppressed = 0;
    dw_fill_header(&e->hdr, DW_KIND_CHDIR, cgid, pid_tgid, now, proc);
    e->retval = ret;
    e->fd = -1;
    e->path_len = 0;
    e->_pad = 0;
    e->cwd_base = cwd_base;
    if (p.path) {
        int n = bpf_probe_read_user_str(e->path, sizeof(e->path), (const char *)p.path);
        if (n < 0) {
            e->hdr.flags |= DW_F_READ_FAILED;
            dw_count(DW_KIND_CHDIR, DW_CNT_READ_FAILED);
        } else {
            e->path_len = n;
            if (n == DW_PATH_MAX)
                e->hdr.flags |= DW_F_PATH_TRUNCATED;
        }
    } else {
        e->fd = p.dirfd;
        e->hdr.flags |= DW_F_FD_ONLY;
    }
    u32 len = e->path_len;
    if (len > DW_PATH_MAX)
        len = DW_PATH_MAX;
    dw_proc_flags(&e->hdr, proc);
    int sent = dw_emit(e, offsetof(struct dw_chdir_event, path) + len, sizeof(*e),
                       DW_KIND_CHDIR, slot);
    if (!sent && ret == 0 && proc)
        proc->cwd_lost = 1;
    else
        dw_proc_sent(sent, e->hdr.flags, proc);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_chdir) { return dw_chdir_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fchdir) { return dw_chdir_exit(args->ret); }

/* ------------------------------------------------------------------ exec */
#if DW_WITH_EXEC

static __always_inline int dw_exec_enter(const char *filename, const char *const *argv,
                                         int dirfd, u16 flags)
{
    u64 cgid = bpf_get_current_cgroup_id();
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (dw_skipped(cgid, pid_tgid))
        return 0;
    u32 zero = 0;
    struct dw_exec_event *e = exec_scratch.lookup(&zero);
    if (!e)
        return 0;
    e->hdr.flags = flags;
    e->hdr.suppressed = 0;
    u32 self = pid_tgid >> 32;
    dw_fill_header(&e->hdr, DW_KIND_EXEC, cgid, pid_tgid, bpf_ktime_get_ns(),
                   proc_of.lookup(&self));
    e->retval = 0;
    e->dirfd = dirfd;
    e->_pad = 0;
    int n = bpf_probe_read_user_str(e->filename, sizeof(e->filename), filename);
    if (n < 0) {
        e->filename_len = 0;
        e->hdr.flags |= DW_F_READ_FAILED;
        dw_count(DW_KIND_EXEC, DW_CNT_READ_FAILED);
    } else {
        e->filename_len = n;
        if (n == DW_PATH_MAX)
            e->hdr.flags |= DW_F_PATH_TRUNCATED;
    }

    u32 off = 0;
    u16 argc = 0;
    u32 argv0_len = 0;
    int i;
    for (i = 0; i < DW_MAX_ARGS; i++) {
        const char *argp = 0;
        if (bpf_probe_read_user(&argp, sizeof(argp), &argv[i]) < 0 || !argp)
            break;
        if (off > DW_ARGS_SIZE - DW_MAX_ARG_LEN) {
            e->hdr.flags |= DW_F_ARGS_TRUNCATED;
            break;
        }
        int m = bpf_probe_read_user_str(&e->args[off], DW_MAX_ARG_LEN, argp);
        if (m < 0) {
            e->hdr.flags |= DW_F_READ_FAILED;
            break;
        }
        if (m >= DW_MAX_ARG_LEN) {
            m = DW_MAX_ARG_LEN;
            e->hdr.flags |= DW_F_ARG_CLIPPED;
        }
        if (i == 0)
            argv0_len = m;
        off += m;
        argc++;
    }
    if (i == DW_MAX_ARGS) {
        const char *more = 0;
        bpf_probe_read_user(&more, sizeof(more), &argv[DW_MAX_ARGS]);
        if (more)
            e->hdr.flags |= DW_F_ARGS_TRUNCATED;
    }
    e->argc = argc;
    e->args_size = off;
    /* the program's name until the exit: the file (absolute only: a relative one depends on
     * the working directory) and argv[0], not the other arguments (a connect names the
     * program, not how it was called); dw_exec_exit sets the real dedup_key */
    u64 program = 0;
    if (n > 1 && e->filename[0] == '/') {
        program = dw_hash_path(e->filename, n, DW_FNV_BASIS);
        program = dw_hash_words(e->args, argv0_len, DW_MAX_ARG_LEN / 8, program);
    }
    e->dedup_key = program;
    u32 tid = (u32)pid_tgid;
    u32 tgid = pid_tgid >> 32;
    if (exec_pending.update(&tid, e) == 0 && tid != tgid)
        exec_threads.update(&tgid, &tid);
    return 0;
}

/* What a process runs now, as the identity its connects are known by: its file and argv[0]
 * (`key`, from dw_exec_enter); a re-exec through /proc (busybox's /proc/self/exe) runs what the
 * process ran before under a new name, so its key is chained to that; an exec of an fd
 * (fexecve, a memfd) or of a relative path has no name a baseline could hold: unknown (0),
 * never filtered. */
static __always_inline void dw_set_program(u32 tgid, struct dw_proc *proc,
                                           struct dw_exec_event *e, u64 key)
{
    u64 program = key;
    if (key && *(u32 *)e->filename == 0x6f72702f             /* "/pro" */
        && e->filename[4] == 'c' && e->filename[5] == '/')
        program = proc && proc->program ? dw_mix(key, proc->program) : 0;
    if (proc) {
        proc->program = program;
    } else if (program) {                 /* began before the probes: learn what it runs now */
        struct dw_proc fresh = {.program = program};
        proc_of.update(&tgid, &fresh);
    }
}

static __always_inline int dw_exec_exit(long ret)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    u32 tgid = pid_tgid >> 32;
    struct dw_exec_event *e = exec_pending.lookup(&tid);
    if (!e) {
        /* a thread's successful exec: it now has the tgid as its pid; the stash is its old one */
        u32 *old = exec_threads.lookup(&tgid);
        if (!old)
            return 0;
        tid = *old;
        e = exec_pending.lookup(&tid);
        if (!e) {
            exec_threads.delete(&tgid);
            return 0;
        }
    }
    if (tid != tgid)
        exec_threads.delete(&tgid);
    e->retval = ret;
    /* after a successful exec the task has its new comm */
    bpf_get_current_comm(&e->hdr.comm, sizeof(e->hdr.comm));
    u32 flen = e->filename_len;
    u32 alen = e->args_size;
    if (alen > DW_ARGS_SIZE)
        alen = DW_ARGS_SIZE;
    u64 h = dw_hash_path(e->filename, flen, DW_FNV_BASIS);
    h = dw_hash_args(e->args, alen, h);
    h = dw_mix(h, (u64)ret);
    if (e->filename[0] != '/')
        h = dw_hash_cwd(h, e->filename, e->hdr.tgid);
    struct dw_proc *proc = proc_of.lookup(&tgid);
    if (ret == 0)
        dw_set_program(tgid, proc, e, e->dedup_key);
    e->dedup_key = h;
    u32 carried = 0;
    struct dw_budget_val *slot = 0;
    if (dw_admit(DW_KIND_EXEC, e->hdr.cgroup_id, h, 0, bpf_ktime_get_ns(), &carried, &slot)) {
        /* a repeat, or over budget: what the process runs now still changed: name the exec
         * (its key, the one of the record sent before if any), in ~100 bytes instead of
         * ~4.7 KB; a failed exec changed nothing, so it is not sent */
        if (ret == 0) {
            struct dw_exec_repeat_event r;
            __builtin_memcpy(&r.hdr, &e->hdr, sizeof(r.hdr));
            r.hdr.kind = DW_KIND_EXEC_REPEAT;
            r.hdr.suppressed = 0;
            r.dedup_key = h;
            r.retval = ret;
            r._pad = 0;
            dw_emit(&r, sizeof(r), sizeof(r), DW_KIND_EXEC_REPEAT, slot);   /* no dedup or budget */
        }
        exec_pending.delete(&tid);
        return 0;
    }
    e->hdr.suppressed = carried;
    dw_proc_flags(&e->hdr, proc);
    dw_proc_sent(dw_emit(e, offsetof(struct dw_exec_event, args) + alen, sizeof(*e),
                        DW_KIND_EXEC, slot), e->hdr.flags, proc);
    exec_pending.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
    return dw_exec_enter(args->filename, args->argv, DW_AT_FDCWD, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
    return dw_exec_enter(args->filename, args->argv, args->fd, DW_F_EXECVEAT);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execve) { return dw_exec_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_execveat) { return dw_exec_exit(args->ret); }

#endif /* DW_WITH_EXEC */
/* ------------------------------------------------------------------ connect */
#if DW_WITH_CONNECT

TRACEPOINT_PROBE(syscalls, sys_enter_socket)
{
    int family = args->family;
    if (family != DW_AF_INET && family != DW_AF_INET6 && family != DW_AF_UNIX)
        return 0;
    /* type without SOCK_NONBLOCK / SOCK_CLOEXEC */
    return dw_stash(DW_KIND_CONNECT, 1, 0, 0, 0, 0, args->type & 0xf, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_socket)
{
    struct dw_pending p;
    if (!dw_unstash(DW_KIND_CONNECT, &p) || p.op != 1)
        return 0;
    if (args->ret < 0)
        return 0;
    struct dw_sock_key key = {.tgid = bpf_get_current_pid_tgid() >> 32, .fd = args->ret};
    u16 type = p.flags;
    u16 *known_type = sock_types.lookup(&key);   /* the fd number was a socket before */
    if (known_type)
        *known_type = type;
    else
        sock_types.update(&key, &type);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    /* addrlen rides in the mode slot */
    return dw_stash(DW_KIND_CONNECT, 2, (const char *)args->uservaddr, 0, args->fd, 0, 0,
                    args->addrlen);
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    struct dw_pending p;
    if (!dw_unstash(DW_KIND_CONNECT, &p) || p.op != 2)
        return 0;
    u32 zero = 0;
    struct dw_connect_event *e = connect_scratch.lookup(&zero);
    if (!e)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 cgid = bpf_get_current_cgroup_id();
    e->hdr.flags = 0;
    e->retval = args->ret;
    e->fd = p.dirfd;
    e->port = 0;
    e->path_len = 0;
    e->_pad = 0;

    struct dw_sock_key key = {.tgid = pid_tgid >> 32, .fd = p.dirfd};
    u16 *type = sock_types.lookup(&key);
    e->sock_type = type ? *type : 0;

    /* the sockaddr in one read: family, port and either address (sockaddr_in6 is 28 bytes);
     * when that runs past the caller's memory, again as a sockaddr_in, then the family alone */
    const char *sa = (const char *)p.path;
    struct {
        u16 family;
        u16 port_be;
        u32 addr4;                       /* sockaddr_in6: sin6_flowinfo */
        u8 addr6[16];
        u32 scope_id;
    } in = {};
    if (bpf_probe_read_user(&in, sizeof(in), sa) < 0
        && bpf_probe_read_user(&in, 16, sa) < 0
        && bpf_probe_read_user(&in.family, sizeof(in.family), sa) < 0) {
        e->hdr.flags |= DW_F_READ_FAILED;
        dw_count(DW_KIND_CONNECT, DW_CNT_READ_FAILED);
    }
    u16 family = in.family;
    e->family = family;
    u64 h = dw_mix(DW_FNV_BASIS, family);
    __builtin_memset(e->addr, 0, sizeof(e->addr));
    if (family == DW_AF_INET || family == DW_AF_INET6) {
        e->port = (in.port_be >> 8) | ((in.port_be & 0xff) << 8);
        if (family == DW_AF_INET)
            __builtin_memcpy(e->addr, &in.addr4, 4);
        else
            __builtin_memcpy(e->addr, in.addr6, 16);
        h = dw_mix(h, *(u64 *)&e->addr[0]);
        h = dw_mix(h, *(u64 *)&e->addr[8]);
        h = dw_mix(h, e->port);
    } else if (family == DW_AF_UNIX) {
        __builtin_memset(e->unix_path, 0, sizeof(e->unix_path));
        u64 n = p.mode;                 /* addrlen; 64-bit so clang needs no zero-extension copy */
        if (n > 2) {
            n -= 2;
            if (n > DW_UNIX_PATH_LEN)
                n = DW_UNIX_PATH_LEN;
            bpf_probe_read_user(e->unix_path, n, sa + 2);
            e->path_len = n;
        }
        for (int i = 0; i < DW_UNIX_PATH_LEN / 8; i++)   /* zeroed above: no stale bytes */
            h = dw_mix(h, *(u64 *)&e->unix_path[i * 8]);
    }
    h = dw_mix(h, ((u64)e->sock_type << 32) | (u32)e->retval);
    /* a connect is the program's that made it: another program's connect to the same place
     * is no repeat (it is judged on its own, and a baseline's connect names its program); a
     * process whose program is unknown (it began before the probes, or ran an fd) repeats
     * only itself */
    u32 tgid = pid_tgid >> 32;
    struct dw_proc *proc = proc_of.lookup(&tgid);
    u64 program = proc ? proc->program : 0;
    h = program ? dw_mix(h, program) : dw_mix(h, (1ULL << 32) | tgid);
    e->known_key = DW_KNOWN_ENTRIES && program ? h : 0;
    u64 now = bpf_ktime_get_ns();
    u32 carried = 0;
    struct dw_budget_val *slot = 0;
    if (dw_admit(DW_KIND_CONNECT, cgid, h, e->known_key, now, &carried, &slot))
        return 0;
    if (family != DW_AF_UNIX)            /* no stale bytes of another connect are sent */
        __builtin_memset(e->unix_path, 0, sizeof(e->unix_path));
    dw_fill_header(&e->hdr, DW_KIND_CONNECT, cgid, pid_tgid, now, proc);
    e->hdr.suppressed = carried;
    dw_proc_flags(&e->hdr, proc);
    dw_proc_sent(dw_emit(e, sizeof(*e), sizeof(*e), DW_KIND_CONNECT, slot), e->hdr.flags, proc);
    return 0;
}

#endif /* DW_WITH_CONNECT */
/* ------------------------------------------------------------------ file writes */
#if DW_WITH_FILE

static __always_inline int dw_wants_write(u32 flags)
{
    return (flags & DW_O_ACCMODE) != 0 || (flags & (DW_O_CREAT | DW_O_TRUNC | DW_O_APPEND)) != 0;
}

static __always_inline int dw_file_enter(u16 op, const char *path, const char *path2, s32 dirfd,
                                         s32 dirfd2, u32 flags, u32 mode)
{
    return dw_stash(DW_KIND_FILE, op, path, path2, dirfd, dirfd2, flags, mode);
}

/* Reads the path(s), decides dedup, sends. `p` holds the syscall's arguments. */
static __always_inline int dw_file_emit(struct dw_pending *pp, long ret, u64 cgid, u64 pid_tgid)
{
    struct dw_pending p = *pp;
    u32 zero = 0;
    struct dw_file_event *e = file_scratch.lookup(&zero);
    if (!e)
        return 0;
    e->hdr.flags = 0;
    e->op = p.op;
    e->retval = ret;
    e->dirfd = p.dirfd;
    e->dirfd2 = p.dirfd2;
    e->open_flags = p.flags;
    e->mode = p.mode;
    e->path_len = 0;
    e->path2_len = 0;
    e->_pad = 0;
    e->_pad2 = 0;

    u64 h = dw_mix(DW_FNV_BASIS, ((u64)p.op << 32) | (u32)ret);
    if (p.path) {
        int n = bpf_probe_read_user_str(e->path, sizeof(e->path), (const char *)p.path);
        if (n < 0) {
            e->hdr.flags |= DW_F_READ_FAILED;
            dw_count(DW_KIND_FILE, DW_CNT_READ_FAILED);
            n = 0;
        } else if (n == DW_PATH_MAX) {
            e->hdr.flags |= DW_F_PATH_TRUNCATED;
        }
        e->path_len = n;
        h = dw_hash_path(e->path, n, h);
        if (n > 0 && p.op != DW_FILE_SYMLINK)    /* a symlink's target is stored, not resolved */
            h = dw_hash_cwd(dw_mix(h, (u32)p.dirfd), e->path, pid_tgid >> 32);
    } else {
        e->hdr.flags |= DW_F_FD_ONLY;
        h = dw_mix(h, ((u64)pid_tgid >> 32 << 32) | (u32)p.dirfd);
    }
    u64 size = offsetof(struct dw_file_event, path2);
    if (p.path2) {
        int n = bpf_probe_read_user_str(e->path2, sizeof(e->path2), (const char *)p.path2);
        if (n < 0) {
            e->hdr.flags |= DW_F_READ_FAILED;
            dw_count(DW_KIND_FILE, DW_CNT_READ_FAILED);
            n = 0;
        } else if (n == DW_PATH_MAX) {
            e->hdr.flags |= DW_F_PATH2_TRUNCATED;
        }
        e->path2_len = n;
        h = dw_hash_path(e->path2, n, h);
        if (n > 0)
            h = dw_hash_cwd(dw_mix(h, (u32)p.dirfd2), e->path2, pid_tgid >> 32);
        u32 len = n;
        if (len > DW_PATH_MAX)
            len = DW_PATH_MAX;
        size += len;
    } else {
        u32 len = e->path_len;
        if (len > DW_PATH_MAX)
            len = DW_PATH_MAX;
        size = offsetof(struct dw_file_event, path) + len;
    }
    /* what was asked matters: chmod +x differs from chmod 644, O_TRUNC from O_APPEND */
    h = dw_mix(h, ((u64)p.mode << 32) | (p.flags & (DW_O_ACCMODE | DW_O_CREAT | DW_O_TRUNC | DW_O_APPEND)));
    /* only absolute paths name the same file whoever writes them (a relative one's hash
     * holds the process and its working directory) */
    e->known_key = 0;
#if DW_KNOWN_ENTRIES
    if (e->path_len > 1 && e->path[0] == '/' && (!p.path2 || (e->path2_len > 1 && e->path2[0] == '/')))
        e->known_key = h;
#endif
    u64 now = bpf_ktime_get_ns();
    u32 carried = 0;
    struct dw_budget_val *slot = 0;
    if (dw_admit(DW_KIND_FILE, cgid, h, e->known_key, now, &carried, &slot))
        return 0;
    u32 tgid = pid_tgid >> 32;
    struct dw_proc *proc = proc_of.lookup(&tgid);
    dw_fill_header(&e->hdr, DW_KIND_FILE, cgid, pid_tgid, now, proc);
    e->hdr.suppressed = carried;
    dw_proc_flags(&e->hdr, proc);
    dw_proc_sent(dw_emit(e, size, sizeof(*e), DW_KIND_FILE, slot), e->hdr.flags, proc);
    return 0;
}

static __always_inline int dw_file_exit(long ret)
{
    struct dw_pending p;
    if (!dw_unstash(DW_KIND_FILE, &p))
        return 0;
    return dw_file_emit(&p, ret, bpf_get_current_cgroup_id(), bpf_get_current_pid_tgid());
}

/* A write-intent open: at entry (default, result unknown) or stashed for its exit. */
static __always_inline int dw_open(const char *path, s32 dirfd, u32 flags, u32 mode)
{
#if DW_OPEN_RESULT
    return dw_file_enter(DW_FILE_OPEN, path, 0, dirfd, 0, flags, mode);
#else
    u64 cgid = bpf_get_current_cgroup_id();
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (dw_skipped(cgid, pid_tgid))
        return 0;
    struct dw_pending p = {};
    dw_fill_pending(&p, DW_KIND_FILE, DW_FILE_OPEN, path, 0, dirfd, 0, flags, mode);
    return dw_file_emit(&p, DW_RESULT_UNKNOWN, cgid, pid_tgid);
#endif
}

#define DW_CREAT_FLAGS (DW_O_CREAT | DW_O_WRONLY | DW_O_TRUNC)

/* Each syscall's entry and exit, together; an optional one (DW_HAVE_*) is compiled as a pair.
 * Opens are reported at entry unless DW_OPEN_RESULT. */
#if DW_HAVE_OPEN
TRACEPOINT_PROBE(syscalls, sys_enter_open)
{
    if (!dw_wants_write(args->flags))
        return 0;
    return dw_open(args->filename, DW_AT_FDCWD, args->flags, args->mode);
}
#if DW_OPEN_RESULT
TRACEPOINT_PROBE(syscalls, sys_exit_open) { return dw_file_exit(args->ret); }
#endif
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
    if (!dw_wants_write(args->flags))
        return 0;
    return dw_open(args->filename, args->dfd, args->flags, args->mode);
}
#if DW_OPEN_RESULT
TRACEPOINT_PROBE(syscalls, sys_exit_openat) { return dw_file_exit(args->ret); }
#endif

#if DW_HAVE_OPENAT2
TRACEPOINT_PROBE(syscalls, sys_enter_openat2)
{
    u64 how[2] = {};
    if (bpf_probe_read_user(how, sizeof(how), args->how) < 0)
        return 0;
    if (!dw_wants_write(how[0]))
        return 0;
    return dw_open(args->filename, args->dfd, how[0], how[1]);
}
#if DW_OPEN_RESULT
TRACEPOINT_PROBE(syscalls, sys_exit_openat2) { return dw_file_exit(args->ret); }
#endif
#endif

#if DW_HAVE_CREAT
TRACEPOINT_PROBE(syscalls, sys_enter_creat)
{
    return dw_open(args->pathname, DW_AT_FDCWD, DW_CREAT_FLAGS, args->mode);
}
#if DW_OPEN_RESULT
TRACEPOINT_PROBE(syscalls, sys_exit_creat) { return dw_file_exit(args->ret); }
#endif
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_truncate)
{
    return dw_file_enter(DW_FILE_TRUNCATE, args->path, 0, DW_AT_FDCWD, 0, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_truncate) { return dw_file_exit(args->ret); }

#if DW_HAVE_RENAME
TRACEPOINT_PROBE(syscalls, sys_enter_rename)
{
    return dw_file_enter(DW_FILE_RENAME, args->oldname, args->newname, DW_AT_FDCWD, DW_AT_FDCWD, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_rename) { return dw_file_exit(args->ret); }
#endif

#if DW_HAVE_RENAMEAT
TRACEPOINT_PROBE(syscalls, sys_enter_renameat)
{
    return dw_file_enter(DW_FILE_RENAME, args->oldname, args->newname, args->olddfd, args->newdfd, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_renameat) { return dw_file_exit(args->ret); }
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_renameat2)
{
    return dw_file_enter(DW_FILE_RENAME, args->oldname, args->newname, args->olddfd, args->newdfd,
                         args->flags, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_renameat2) { return dw_file_exit(args->ret); }

#if DW_HAVE_UNLINK
TRACEPOINT_PROBE(syscalls, sys_enter_unlink)
{
    return dw_file_enter(DW_FILE_UNLINK, args->pathname, 0, DW_AT_FDCWD, 0, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_unlink) { return dw_file_exit(args->ret); }
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_unlinkat)
{
    u16 op = (args->flag & DW_AT_REMOVEDIR) ? DW_FILE_RMDIR : DW_FILE_UNLINK;
    return dw_file_enter(op, args->pathname, 0, args->dfd, 0, args->flag, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_unlinkat) { return dw_file_exit(args->ret); }

#if DW_HAVE_RMDIR
TRACEPOINT_PROBE(syscalls, sys_enter_rmdir)
{
    return dw_file_enter(DW_FILE_RMDIR, args->pathname, 0, DW_AT_FDCWD, 0, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_rmdir) { return dw_file_exit(args->ret); }
#endif

#if DW_HAVE_CHMOD
TRACEPOINT_PROBE(syscalls, sys_enter_chmod)
{
    return dw_file_enter(DW_FILE_CHMOD, args->filename, 0, DW_AT_FDCWD, 0, 0, args->mode);
}
TRACEPOINT_PROBE(syscalls, sys_exit_chmod) { return dw_file_exit(args->ret); }
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_fchmod)
{
    return dw_file_enter(DW_FILE_CHMOD, 0, 0, args->fd, 0, 0, args->mode);
}
TRACEPOINT_PROBE(syscalls, sys_exit_fchmod) { return dw_file_exit(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_fchmodat)
{
    return dw_file_enter(DW_FILE_CHMOD, args->filename, 0, args->dfd, 0, 0, args->mode);
}
TRACEPOINT_PROBE(syscalls, sys_exit_fchmodat) { return dw_file_exit(args->ret); }

#if DW_HAVE_FCHMODAT2
TRACEPOINT_PROBE(syscalls, sys_enter_fchmodat2)
{
    return dw_file_enter(DW_FILE_CHMOD, args->filename, 0, args->dfd, 0, args->flags, args->mode);
}
TRACEPOINT_PROBE(syscalls, sys_exit_fchmodat2) { return dw_file_exit(args->ret); }
#endif

#if DW_HAVE_LINK
TRACEPOINT_PROBE(syscalls, sys_enter_link)
{
    return dw_file_enter(DW_FILE_LINK, args->oldname, args->newname, DW_AT_FDCWD, DW_AT_FDCWD, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_link) { return dw_file_exit(args->ret); }
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_linkat)
{
    return dw_file_enter(DW_FILE_LINK, args->oldname, args->newname, args->olddfd, args->newdfd,
                         args->flags, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_linkat) { return dw_file_exit(args->ret); }

#if DW_HAVE_SYMLINK
TRACEPOINT_PROBE(syscalls, sys_enter_symlink)
{
    return dw_file_enter(DW_FILE_SYMLINK, args->oldname, args->newname, DW_AT_FDCWD, DW_AT_FDCWD, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_symlink) { return dw_file_exit(args->ret); }
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_symlinkat)
{
    return dw_file_enter(DW_FILE_SYMLINK, args->oldname, args->newname, DW_AT_FDCWD, args->newdfd, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_symlinkat) { return dw_file_exit(args->ret); }

#if DW_HAVE_MKDIR
TRACEPOINT_PROBE(syscalls, sys_enter_mkdir)
{
    return dw_file_enter(DW_FILE_MKDIR, args->pathname, 0, DW_AT_FDCWD, 0, 0, args->mode);
}
TRACEPOINT_PROBE(syscalls, sys_exit_mkdir) { return dw_file_exit(args->ret); }
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_mkdirat)
{
    return dw_file_enter(DW_FILE_MKDIR, args->pathname, 0, args->dfd, 0, 0, args->mode);
}
TRACEPOINT_PROBE(syscalls, sys_exit_mkdirat) { return dw_file_exit(args->ret); }

#if DW_HAVE_MKNOD
TRACEPOINT_PROBE(syscalls, sys_enter_mknod)
{
    return dw_file_enter(DW_FILE_MKNOD, args->filename, 0, DW_AT_FDCWD, 0, 0, args->mode);
}
TRACEPOINT_PROBE(syscalls, sys_exit_mknod) { return dw_file_exit(args->ret); }
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_mknodat)
{
    return dw_file_enter(DW_FILE_MKNOD, args->filename, 0, args->dfd, 0, 0, args->mode);
}
TRACEPOINT_PROBE(syscalls, sys_exit_mknodat) { return dw_file_exit(args->ret); }

#endif /* DW_WITH_FILE */
