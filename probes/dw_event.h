/* SPDX-License-Identifier: Apache-2.0
 *
 * driftwarden kernel event layout: the one definition shared by the BPF programs
 * (driftwarden.bpf.c) and mirrored field for field by probes/_layout.py.
 * tests/test_layout.py compiles this header with gcc and checks every size and offset.
 *
 * Rules that keep the mirror simple: fields ordered so there is no implicit padding
 * (explicit _pad fields where needed), little-endian, no pointers.
 */
#ifndef DRIFTWARDEN_DW_EVENT_H
#define DRIFTWARDEN_DW_EVENT_H

#include <linux/types.h>

/* Bounds: compile-time settings, overridable with -D (see probes/loader.py). */
#ifndef DW_PATH_MAX
#define DW_PATH_MAX 512          /* bytes kept of each path, NUL included; power of two */
#endif
#ifndef DW_MAX_ARGS
#define DW_MAX_ARGS 32           /* argv entries kept */
#endif
#ifndef DW_MAX_ARG_LEN
#define DW_MAX_ARG_LEN 256       /* bytes kept of each argv entry, NUL included */
#endif
#ifndef DW_ARGS_SIZE
#define DW_ARGS_SIZE 4096        /* bytes of argv kept in all; power of two */
#endif
#define DW_COMM_LEN 16
#define DW_UNIX_PATH_LEN 108     /* sizeof(sockaddr_un.sun_path) */

/* Event kinds. Keep in sync with EventKind in probes/_layout.py. */
enum dw_kind {
    DW_KIND_EXEC = 1,
    DW_KIND_CONNECT = 2,
    DW_KIND_FILE = 3,
    DW_KIND_CHDIR = 4,           /* bookkeeping: lets userspace resolve relative paths */
    DW_KIND_FORK = 5,            /* bookkeeping: a new process (never a thread) */
    DW_KIND_EXIT = 6,            /* bookkeeping: a process (never a thread) ended */
    DW_KIND_EXEC_REPEAT = 7,     /* bookkeeping: a successful exec the dedup map suppressed */
    DW_KIND_MAX = 8,
};

/* Per-kind counters, exported from the per-CPU array `counters` at
 * index kind * DW_CNT_MAX + counter. */
enum dw_counter {
    DW_CNT_EMITTED = 0,          /* records written to the ring buffer */
    DW_CNT_SUPPRESSED = 1,       /* repeats dropped by the dedup map */
    DW_CNT_DROPPED = 2,          /* ring buffer full: record lost */
    DW_CNT_READ_FAILED = 3,      /* user memory could not be read (path or sockaddr) */
    DW_CNT_OVER_BUDGET = 4,      /* held back: its container was over its budget for the kind */
    DW_CNT_KNOWN = 5,            /* not sent: its container's baseline holds it (map `known`) */
    DW_CNT_MAX = 6,
};

/* File operations (struct dw_file_event.op). */
enum dw_file_op {
    DW_FILE_OPEN = 1,            /* open/openat/openat2/creat with write intent */
    DW_FILE_RENAME = 2,          /* path -> path2 */
    DW_FILE_UNLINK = 3,
    DW_FILE_RMDIR = 4,
    DW_FILE_CHMOD = 5,           /* mode kept */
    DW_FILE_LINK = 6,            /* hard link: path (existing) -> path2 (new) */
    DW_FILE_SYMLINK = 7,         /* path (target, as given) <- path2 (new link) */
    DW_FILE_MKDIR = 8,
    DW_FILE_MKNOD = 9,           /* mode keeps S_IFIFO / S_IFCHR / ... */
    DW_FILE_TRUNCATE = 10,
};

/* dw_event_header.flags */
#define DW_F_PATH_TRUNCATED   0x0001   /* path (or exec filename) hit DW_PATH_MAX */
#define DW_F_PATH2_TRUNCATED  0x0002
#define DW_F_ARGS_TRUNCATED   0x0004   /* more argv entries or bytes than kept */
#define DW_F_ARG_CLIPPED      0x0008   /* at least one argv entry hit DW_MAX_ARG_LEN */
#define DW_F_READ_FAILED      0x0010   /* a user pointer could not be read */
#define DW_F_FD_ONLY          0x0020   /* operation named an fd, not a path (fchmod, fchdir) */
#define DW_F_EXECVEAT         0x0040
#define DW_F_CWD_LOST         0x0080   /* a chdir of this process was not sent (over budget or
                                        * dropped): its cwd must be read again */
#define DW_F_FORK_UNSENT      0x0100   /* this process's fork was not sent (over budget or
                                        * dropped): it inherits its parent's program and cwd */

#define DW_AT_FDCWD (-100)
#define DW_RESULT_UNKNOWN 0x7fffffff   /* retval of an event reported before its syscall ran */

/* A process is (tgid, start_ns): a pid the kernel hands out again names another process.
 * start_ns is bpf_ktime_get_boot_ns() at the process's sched_process_fork (CLOCK_BOOTTIME), 0
 * when the probes never saw it fork (it began before they attached, or its entry was evicted). */
struct dw_event_header {
    __u64 ts_ns;                 /* bpf_ktime_get_ns(), CLOCK_MONOTONIC */
    __u64 cgroup_id;             /* cgroup v2 id = inode of the cgroup directory */
    __u64 start_ns;              /* this process's start (tgid, start_ns): see above */
    __u64 parent_start_ns;       /* its parent's start, with ppid; 0 = unknown */
    __u16 kind;                  /* enum dw_kind */
    __u16 flags;                 /* DW_F_* */
    __u32 pid;                   /* thread id (host pid namespace) */
    __u32 tgid;                  /* process id (host pid namespace) */
    __u32 ppid;                  /* parent tgid from sched_process_fork; 0 = unknown */
    __u32 uid;
    __u32 gid;
    __u32 suppressed;            /* repeats of this event's key suppressed since the last one sent */
    __u32 _pad;
    char comm[DW_COMM_LEN];
};

struct dw_exec_event {
    struct dw_event_header hdr;
    __s32 retval;                /* 0 or -errno */
    __s32 dirfd;                 /* execveat dirfd, AT_FDCWD for execve */
    __u16 argc;                  /* argv entries kept in args[] */
    __u16 args_size;             /* bytes used in args[] */
    __u16 filename_len;          /* bytes in filename[], NUL included */
    __u16 _pad;
    __u64 dedup_key;             /* hash of filename, argv, result (and cwd for a relative
                                  * filename): what a dw_exec_repeat_event names */
    char filename[DW_PATH_MAX];  /* as passed to execve */
    char args[DW_ARGS_SIZE];     /* argv entries, each NUL-terminated, back to back */
};

struct dw_connect_event {
    struct dw_event_header hdr;
    __s32 retval;                /* 0, -EINPROGRESS, -ECONNREFUSED, ... */
    __s32 fd;
    __u16 family;                /* AF_INET, AF_INET6, AF_UNIX, ... */
    __u16 port;                  /* host byte order */
    __u16 sock_type;             /* SOCK_STREAM, SOCK_DGRAM; 0 = socket created before tracing */
    __u16 path_len;              /* bytes in unix_path (abstract names start with NUL) */
    __u8 addr[16];               /* IPv4 in the first 4 bytes, or IPv6 */
    char unix_path[DW_UNIX_PATH_LEN];
    __u32 _pad;
    __u64 known_key;             /* its identity for the map `known` (address, result, socket
                                  * type, the program that connected); 0: never filtered */
};

struct dw_file_event {
    struct dw_event_header hdr;
    __u16 op;                    /* enum dw_file_op */
    __u16 path_len;              /* bytes in path[], NUL included; 0 if DW_F_FD_ONLY */
    __u16 path2_len;
    __u16 _pad;
    __s32 retval;                /* result, or DW_RESULT_UNKNOWN (opens, reported at entry) */
    __s32 dirfd;                 /* dirfd for path (AT_FDCWD if none); the fd for fchmod */
    __s32 dirfd2;                /* dirfd for path2 */
    __u32 open_flags;            /* open: O_* flags; unlinkat/renameat2/linkat: their flags */
    __u32 mode;                  /* chmod / mkdir / mknod / creating opens */
    __u32 _pad2;
    __u64 known_key;             /* its identity for the map `known` (operation, absolute
                                  * paths, flags, mode); 0: never filtered (a relative path) */
    char path[DW_PATH_MAX];
    char path2[DW_PATH_MAX];
};

struct dw_chdir_event {
    struct dw_event_header hdr;
    __s32 retval;
    __s32 fd;                    /* fchdir's fd; -1 for chdir */
    __u16 path_len;
    __u16 _pad;
    __u32 cwd_base;              /* tgid whose working directory this process had before the
                                  * call (itself, or the ancestor it inherited it from at
                                  * fork); 0 when unknown. Resolves a relative chdir after the
                                  * process and its parent are gone. */
    char path[DW_PATH_MAX];
};

/* The header is the parent's (the process that forked); sent for non-host cgroups only. */
struct dw_fork_event {
    struct dw_event_header hdr;
    __u64 child_start_ns;        /* the child's start_ns, as its own events will carry it */
    __u32 child_tgid;
    __u32 _pad;
};

/* A successful exec the dedup map suppressed, or that its container's budget held back: the
 * exec'ing process's header (kind DW_KIND_EXEC_REPEAT) and the dedup_key of the exec (a
 * dw_exec_event sent before with that key, if any), so userspace can keep its process table
 * (what the process runs now) without the 4.7 KB record. Only successful execs: a failed one
 * changes no process. */
struct dw_exec_repeat_event {
    struct dw_event_header hdr;
    __u64 dedup_key;
    __s32 retval;
    __u32 _pad;
};

/* The header is the process that ended (its last event); sent for non-host cgroups only. */
struct dw_exit_event {
    struct dw_event_header hdr;
};

#endif /* DRIFTWARDEN_DW_EVENT_H */
