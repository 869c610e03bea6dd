/*
 * dwstorm: a small static event generator for driftwarden benchmarks and loss tests.
 *
 * Runs inside containers (or on the host as a baseline). Build:
 *   gcc -O2 -static -pthread -o dwstorm bench/storm.c
 * (tests/support/images.py does this and bakes it into the "dw-storm" image as /bin/dwstorm).
 *
 * Usage:
 *   dwstorm MODE COUNT [ARG] [--rate N] [--seconds S] [--unlink] [--linger S]
 *   dwstorm MODE --seconds S [ARG] [--rate N] [--unlink]      (time bound replaces COUNT)
 *
 * Modes (one "event" each):
 *   exec      fork + execve(ARG, [ARG]) + waitpid.  ARG defaults to /bin/true (in a busybox
 *             image that is a symlink to busybox, which picks the applet from argv[0]).
 *   connect   TCP connect + close to a loopback ARG ("PORT", "127.x.y.z:PORT", "[::1]:PORT").
 *             Without ARG, dwstorm starts its own listener thread on 127.0.0.1 (ephemeral
 *             port) that accepts and closes, so no other process is needed.  The client closes
 *             with RST (SO_LINGER 0): otherwise long storms park ephemeral ports in TIME_WAIT
 *             and connect() starts failing with EADDRNOTAVAIL after ~28K connections.
 *             With ARG and --serve, that listener is on ARG: the same destination every run
 *             (a baseline can learn it).
 *   listen    accept + close on loopback ARG (required, same forms as connect).  COUNT 0 means
 *             until SIGTERM/SIGINT (the summary line is still printed).
 *   open      open(ARG, O_WRONLY|O_CREAT|O_APPEND) + write 1 byte + close, same path every time.
 *             ARG defaults to /tmp/dwstorm.open.
 *   udp       UDP connect + one datagram + close to loopback ARG (required; nobody listens).
 *   unix      AF_UNIX stream connect + close to path ARG ("@name" = abstract namespace);
 *             without a listener it fails with ECONNREFUSED/ENOENT, which is still an event.
 *   fileops   one of each: creat, openat2, truncate, fchmod, renameat, linkat, symlinkat,
 *             fchmodat (setuid), mkdirat, unlinkat (dir and file), mknodat (FIFO), the *at()
 *             ones relative to a directory fd, in directory ARG (default /tmp/fileops).
 *   openuniq  the same on ARG.N (N = loop index) so in-kernel dedup of repeated paths cannot
 *             suppress events.  ARG defaults to /tmp/dwstorm.uniq.  --unlink removes each file
 *             after closing it (keeps huge storms from filling the container layer).
 *
 * --rate N     at most N events per second, spread evenly: events are paced in batches of
 *              max(1, N/1000) with an absolute-deadline nanosleep before each batch, so the
 *              sleep granularity stays around 1 ms whatever the rate.
 * --seconds S  stop after S seconds (fractions allowed); COUNT may then be omitted.
 * --linger S   stay alive S seconds after printing the summary (so /proc/PID can be read).
 * --serve      connect: serve ARG itself (see connect).
 * --cycle K    openuniq: ARG.NAME for K names in turn (letters g-z, no digits or hex: a baseline
 *              learns each name as it is, not as a pattern), instead of a new path each time.
 *
 * Only loopback addresses are accepted (127.0.0.0/8, ::1, "localhost"); anything else is
 * refused before any socket is created (exit 2).
 *
 * Output: exactly one JSON line on stdout at the end:
 *   {"mode":"open","count":100,"errors":0,"elapsed_ns":123456}
 * count = events attempted, errors = events that failed (count includes them).
 * Exit: 0 all events succeeded, 3 some failed, 2 usage error or refused address, 1 setup error.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

enum mode { M_EXEC, M_CONNECT, M_LISTEN, M_OPEN, M_OPENUNIQ, M_UDP, M_UNIX, M_FILEOPS };

struct opts {
    enum mode mode;
    const char *mode_name;
    long long count;      /* < 0: unbounded (only with --seconds, or listen 0) */
    const char *arg;      /* NULL: mode default */
    double rate;          /* <= 0: unpaced */
    double seconds;       /* <= 0: no time bound */
    int unlink_files;
    double linger;        /* seconds to stay alive after the summary (lets /proc be read) */
    int serve;            /* connect: listen on ARG too */
    long long cycle;      /* openuniq: K names in turn; 0: a new one each time */
};

struct ctx {
    const struct opts *o;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int listen_fd;
    int64_t deadline_ns;  /* 0: none */
    char path[4096];
};

/* Event result: done, failed, or "nothing happened, stop" (timeout/signal in listen). */
enum { EV_OK = 0, EV_ERR = -1, EV_STOP = 1 };

static volatile sig_atomic_t g_stop;

static void on_signal(int sig) {
    (void)sig;
    g_stop = 1;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_until(int64_t t_ns) {
    struct timespec ts = {.tv_sec = t_ns / 1000000000LL, .tv_nsec = t_ns % 1000000000LL};
    while (!g_stop && clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static void usage(void) {
    fprintf(stderr,
            "usage: dwstorm exec|connect|listen|open|openuniq COUNT [ARG] "
            "[--rate N] [--seconds S] [--unlink] [--linger S]\n"
            "       dwstorm MODE --seconds S [ARG] ...   (see bench/storm.c)\n");
    exit(2);
}

static int parse_port(const char *s) {
    char *end;
    errno = 0;
    long p = strtol(s, &end, 10);
    if (errno || end == s || *end || p < 0 || p > 65535) return -1;
    return (int)p;
}

/* Loopback-only address parser: PORT | HOST:PORT | [V6]:PORT.  Returns 0 or -1 (refused). */
static int parse_loopback(const char *arg, struct sockaddr_storage *ss, socklen_t *len) {
    char host[128] = "127.0.0.1";
    const char *port_s = arg;
    const char *colon;

    memset(ss, 0, sizeof(*ss));
    if (arg[0] == '[') {
        const char *close = strchr(arg, ']');
        if (!close || close[1] != ':' || (size_t)(close - arg - 1) >= sizeof(host)) return -1;
        memcpy(host, arg + 1, (size_t)(close - arg - 1));
        host[close - arg - 1] = '\0';
        port_s = close + 2;
    } else if ((colon = strrchr(arg, ':')) != NULL) {
        if ((size_t)(colon - arg) >= sizeof(host)) return -1;
        memcpy(host, arg, (size_t)(colon - arg));
        host[colon - arg] = '\0';
        port_s = colon + 1;
    }
    int port = parse_port(port_s);
    if (port < 0) return -1;
    if (strcmp(host, "localhost") == 0) strcpy(host, "127.0.0.1");

    struct sockaddr_in *in4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
        if ((ntohl(in4->sin_addr.s_addr) >> 24) != 127) return -1;
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        *len = sizeof(*in4);
        return 0;
    }
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        if (!IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr)) return -1;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        *len = sizeof(*in6);
        return 0;
    }
    return -1;
}

static void parse_args(int argc, char **argv, struct opts *o) {
    const char *pos[3];
    int npos = 0;

    memset(o, 0, sizeof(*o));
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--rate") == 0 && i + 1 < argc) {
            o->rate = strtod(argv[++i], NULL);
            if (o->rate <= 0) usage();
        } else if (strcmp(a, "--seconds") == 0 && i + 1 < argc) {
            o->seconds = strtod(argv[++i], NULL);
            if (o->seconds <= 0) usage();
        } else if (strcmp(a, "--unlink") == 0) {
            o->unlink_files = 1;
        } else if (strcmp(a, "--serve") == 0) {
            o->serve = 1;
        } else if (strcmp(a, "--cycle") == 0 && i + 1 < argc) {
            o->cycle = strtoll(argv[++i], NULL, 10);
            if (o->cycle < 1) usage();
        } else if (strcmp(a, "--linger") == 0 && i + 1 < argc) {
            o->linger = strtod(argv[++i], NULL);
            if (o->linger < 0) usage();
        } else if (strncmp(a, "--", 2) == 0 || npos == 3) {
            usage();
        } else {
            pos[npos++] = a;
        }
    }
    if (npos < 1) usage();

    static const struct { const char *name; enum mode m; } modes[] = {
        {"exec", M_EXEC}, {"connect", M_CONNECT}, {"listen", M_LISTEN},
        {"open", M_OPEN}, {"openuniq", M_OPENUNIQ}, {"udp", M_UDP}, {"unix", M_UNIX},
        {"fileops", M_FILEOPS},
    };
    o->mode_name = NULL;
    for (size_t k = 0; k < sizeof(modes) / sizeof(modes[0]); k++) {
        if (strcmp(pos[0], modes[k].name) == 0) {
            o->mode = modes[k].m;
            o->mode_name = modes[k].name;
        }
    }
    if (!o->mode_name) usage();

    int argi = 1;
    o->count = -1;
    if (o->seconds <= 0) {
        /* COUNT is required when there is no time bound. */
        if (npos < 2) usage();
        char *end;
        o->count = strtoll(pos[1], &end, 10);
        if (*end || o->count < 0) usage();
        if (o->count == 0 && o->mode != M_LISTEN) usage(); /* traffic loops must be bounded */
        if (o->count == 0) o->count = -1;
        argi = 2;
    }
    if (npos > argi + 1) usage();
    o->arg = npos > argi ? pos[argi] : NULL;
}

/* ---- listener ------------------------------------------------------------------------ */

static int make_listener(struct sockaddr_storage *ss, socklen_t *len) {
    int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0) return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)ss, *len) < 0 || listen(fd, SOMAXCONN) < 0) {
        close(fd);
        return -1;
    }
    /* Learn the ephemeral port when asked to bind port 0. */
    getsockname(fd, (struct sockaddr *)ss, len);
    return fd;
}

/* Wait for a connection until the deadline or a signal; then accept and close it. */
static int ev_accept(struct ctx *c, long long i) {
    (void)i;
    for (;;) {
        int timeout_ms = -1;
        if (c->deadline_ns) {
            int64_t left = c->deadline_ns - now_ns();
            if (left <= 0) return EV_STOP;
            timeout_ms = (int)(left / 1000000) + 1;
        }
        struct pollfd p = {.fd = c->listen_fd, .events = POLLIN};
        int r = poll(&p, 1, timeout_ms);
        if (g_stop) return EV_STOP;
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return EV_ERR;
        if (r == 0) continue; /* re-check the deadline */
        int fd = accept4(c->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) return (errno == EINTR || errno == EAGAIN) ? EV_STOP : EV_ERR;
        close(fd);
        return EV_OK;
    }
}

static void *acceptor_thread(void *arg) {
    int fd = *(int *)arg;
    for (;;) {
        int cfd = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
        if (cfd >= 0) close(cfd);
    }
    return NULL;
}

/* ---- events -------------------------------------------------------------------------- */

static int ev_exec(struct ctx *c, long long i) {
    (void)i;
    char *argv[] = {(char *)c->path, NULL};
    pid_t pid = fork();
    if (pid < 0) return EV_ERR;
    if (pid == 0) {
        execve(c->path, argv, environ);
        _exit(127);
    }
    int st;
    while (waitpid(pid, &st, 0) < 0) {
        if (errno != EINTR) return EV_ERR;
    }
    return (WIFEXITED(st) && WEXITSTATUS(st) == 0) ? EV_OK : EV_ERR;
}

static int ev_connect(struct ctx *c, long long i) {
    (void)i;
    int fd = socket(c->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return EV_ERR;
    int rc = connect(fd, (struct sockaddr *)&c->addr, c->addrlen);
    if (rc == 0) {
        struct linger lg = {.l_onoff = 1, .l_linger = 0}; /* RST close: no TIME_WAIT */
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    close(fd);
    return rc == 0 ? EV_OK : EV_ERR;
}

/* UDP connect() + one datagram + close; nobody needs to listen. */
static int ev_udp(struct ctx *c, long long i) {
    (void)i;
    int fd = socket(c->addr.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return EV_ERR;
    int rc = connect(fd, (struct sockaddr *)&c->addr, c->addrlen);
    if (rc == 0) (void)send(fd, "x", 1, MSG_DONTWAIT);
    close(fd);
    return rc == 0 ? EV_OK : EV_ERR;
}

/* AF_UNIX stream connect to a path ("@name" = abstract namespace) + close. */
static int ev_unix(struct ctx *c, long long i) {
    (void)i;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return EV_ERR;
    int rc = connect(fd, (struct sockaddr *)&c->addr, c->addrlen);
    close(fd);
    return rc == 0 ? EV_OK : EV_ERR;
}

static void setup_unix(struct ctx *c) {
    const char *p = c->o->arg ? c->o->arg : "/tmp/dwstorm.sock";
    struct sockaddr_un *un = (struct sockaddr_un *)&c->addr;
    size_t n = strlen(p);
    if (n == 0 || n >= sizeof(un->sun_path)) {
        fprintf(stderr, "dwstorm: unix path must be 1..%zu bytes\n", sizeof(un->sun_path) - 1);
        exit(2);
    }
    un->sun_family = AF_UNIX;
    memcpy(un->sun_path, p, n);
    if (p[0] == '@') un->sun_path[0] = '\0'; /* abstract: leading NUL, no terminator */
    c->addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (p[0] == '@' ? 0 : 1));
}

/* One of each file syscall the probes trace that shell tools rarely make, in directory
 * c->path: creat, openat2, truncate, fchmod, and the dirfd-relative *at() family (paths
 * relative to an open directory fd, which the agent resolves through /proc/PID/fd). */
static int ev_fileops(struct ctx *c, long long i) {
    (void)i;
    char p[sizeof(c->path) + 16];
    int bad = 0;
    snprintf(p, sizeof(p), "%s/creat.txt", c->path);
    int fd = creat(p, 0640);
    bad |= fd < 0;
    if (fd >= 0) {
        bad |= fchmod(fd, 0750) != 0;
        if (c->o->linger <= 0) close(fd);  /* lingering keeps fds open for /proc readers */
    }
    bad |= truncate(p, 0) != 0;
    snprintf(p, sizeof(p), "%s/openat2.txt", c->path);
    struct { uint64_t flags, mode, resolve; } how = {O_WRONLY | O_CREAT | O_CLOEXEC, 0600, 0};
    fd = (int)syscall(SYS_openat2, AT_FDCWD, p, &how, sizeof(how));
    bad |= fd < 0;
    if (fd >= 0) close(fd);
    int dir = open(c->path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir < 0) return EV_ERR;
    bad |= renameat(dir, "creat.txt", dir, "renamed.txt") != 0;
    bad |= linkat(dir, "renamed.txt", dir, "hardlink.txt", 0) != 0;
    bad |= symlinkat("renamed.txt", dir, "symlink.txt") != 0;
    bad |= fchmodat(dir, "renamed.txt", 04755, 0) != 0;
    bad |= mkdirat(dir, "subdir", 0700) != 0;
    bad |= unlinkat(dir, "subdir", AT_REMOVEDIR) != 0;
    bad |= mknodat(dir, "fifo", S_IFIFO | 0600, 0) != 0;
    bad |= unlinkat(dir, "hardlink.txt", 0) != 0;
    if (c->o->linger <= 0) close(dir);
    return bad ? EV_ERR : EV_OK;
}

static int write_one(const char *path, int unlink_after) {
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) return EV_ERR;
    ssize_t n = write(fd, "x", 1);
    close(fd);
    if (unlink_after) unlink(path);
    return n == 1 ? EV_OK : EV_ERR;
}

static int ev_open(struct ctx *c, long long i) {
    (void)i;
    return write_one(c->path, c->o->unlink_files);
}

static int ev_openuniq(struct ctx *c, long long i) {
    char p[sizeof(c->path) + 24];
    if (c->o->cycle > 0) {
        char name[16];
        int n = 0;
        long long k = i % c->o->cycle;
        do {
            name[n++] = (char)('g' + k % 20);
            k /= 20;
        } while (k > 0 && n < 15);
        name[n] = 0;
        snprintf(p, sizeof(p), "%s.%s", c->path, name);
    } else {
        snprintf(p, sizeof(p), "%s.%lld", c->path, i);
    }
    return write_one(p, c->o->unlink_files);
}

/* ---- setup & main loop --------------------------------------------------------------- */

static void refuse(const char *arg) {
    fprintf(stderr, "dwstorm: refusing address '%s': only loopback (127.0.0.0/8, [::1]) "
                    "with an explicit port is allowed\n", arg);
    exit(2);
}

static void set_path(struct ctx *c, const char *dflt) {
    const char *p = c->o->arg ? c->o->arg : dflt;
    if (strlen(p) >= sizeof(c->path)) {
        fprintf(stderr, "dwstorm: path too long\n");
        exit(2);
    }
    strcpy(c->path, p);
}

static void setup_connect(struct ctx *c) {
    if (c->o->arg) {
        if (parse_loopback(c->o->arg, &c->addr, &c->addrlen) < 0) refuse(c->o->arg);
        if (!c->o->serve)
            return;
    } else {
        /* No target given: serve ourselves from a thread on an ephemeral loopback port. */
        parse_loopback("127.0.0.1:0", &c->addr, &c->addrlen);
    }
    static int fd;
    fd = make_listener(&c->addr, &c->addrlen);
    pthread_t t;
    if (fd < 0 || pthread_create(&t, NULL, acceptor_thread, &fd) != 0) {
        perror("dwstorm: self listener");
        exit(1);
    }
    pthread_detach(t);
}

static void setup_listen(struct ctx *c) {
    if (!c->o->arg) usage();
    if (parse_loopback(c->o->arg, &c->addr, &c->addrlen) < 0) refuse(c->o->arg);
    c->listen_fd = make_listener(&c->addr, &c->addrlen);
    if (c->listen_fd < 0) {
        perror("dwstorm: listen");
        exit(1);
    }
}

typedef int (*event_fn)(struct ctx *, long long);

static event_fn setup(struct ctx *c) {
    switch (c->o->mode) {
    case M_EXEC: set_path(c, "/bin/true"); return ev_exec;
    case M_CONNECT: setup_connect(c); return ev_connect;
    case M_LISTEN: setup_listen(c); return ev_accept;
    case M_OPEN: set_path(c, "/tmp/dwstorm.open"); return ev_open;
    case M_OPENUNIQ: set_path(c, "/tmp/dwstorm.uniq"); return ev_openuniq;
    case M_UDP:
        if (!c->o->arg) usage();
        if (parse_loopback(c->o->arg, &c->addr, &c->addrlen) < 0) refuse(c->o->arg);
        return ev_udp;
    case M_UNIX: setup_unix(c); return ev_unix;
    case M_FILEOPS: set_path(c, "/tmp/fileops"); return ev_fileops;
    }
    return NULL;
}

static void install_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal; /* no SA_RESTART: blocking accept/poll must return EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
}

int main(int argc, char **argv) {
    struct opts o;
    struct ctx c;

    parse_args(argc, argv, &o);
    memset(&c, 0, sizeof(c));
    c.o = &o;
    c.listen_fd = -1;
    install_signals();
    event_fn fn = setup(&c);

    long long batch = o.rate > 0 ? (long long)(o.rate / 1000.0) : 0;
    if (o.rate > 0 && batch < 1) batch = 1;
    long long done = 0, errors = 0;
    int64_t start = now_ns();
    c.deadline_ns = o.seconds > 0 ? start + (int64_t)(o.seconds * 1e9) : 0;

    while (!g_stop && (o.count < 0 || done < o.count)) {
        if (c.deadline_ns && now_ns() >= c.deadline_ns) break;
        if (batch && done % batch == 0) {
            int64_t due = start + (int64_t)((double)done * 1e9 / o.rate);
            if (c.deadline_ns && due >= c.deadline_ns) break;
            sleep_until(due);
            if (g_stop) break;
        }
        int r = fn(&c, done);
        if (r == EV_STOP) break;
        if (r == EV_ERR) errors++;
        done++;
    }
    int64_t elapsed = now_ns() - start;

    printf("{\"mode\":\"%s\",\"count\":%lld,\"errors\":%lld,\"elapsed_ns\":%lld}\n",
           o.mode_name, done, errors, (long long)elapsed);
    fflush(stdout);
    if (o.linger > 0) {
        struct timespec ts = {(time_t)o.linger, (long)((o.linger - (time_t)o.linger) * 1e9)};
        nanosleep(&ts, NULL);
    }
    return errors ? 3 : 0;
}
