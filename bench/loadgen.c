/*
 * loadgen: Loom's load generator. Raw sockets, one epoll loop, hand-parsed
 * HTTP/1.1 and chunked encoding, so that the generator is never what limits
 * a benchmark. bench/ compiles it on the fly (gcc -O2) and reads the single
 * JSON object it prints on stdout.
 *
 *   loadgen loopback BYTES
 *       raw TCP between two processes (fork), 64 KiB writes: the machine's limit
 *   loadgen append PATH BYTES
 *       append BYTES to a file in 64 KiB writes, then fsync
 *   loadgen bulk PORT STREAM BYTES
 *       W1: one producer sends BYTES in 64 KiB chunks while one follower follows live
 *   loadgen replay PORT STREAM
 *       W1: read a complete stream as fast as possible
 *   loadgen lines PORT PRODUCERS FOLLOWERS_EACH INTERVAL_MS SECONDS LINE_BYTES
 *       W2/W3: producers write a timestamped line every interval; followers measure latency
 *   loadgen slow PORT STREAM BYTES RATE
 *       W4: one producer sends BYTES flat out; one follower reads RATE bytes/s
 *   loadgen get PORT PREFIX COUNT REQUESTS
 *       W5: GET random streams PREFIX-%07d one after another; time to first byte
 *   loadgen fanout N INTERVAL_MS SECONDS LINE_BYTES
 *       the floor for W2: one process sends each line to N loopback sockets,
 *       another receives them; what the kernel alone costs per delivery
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (64 * 1024)
#define MAX_EVENTS 256

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loadgen: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double cpu_seconds(int who) {
    struct rusage ru;
    getrusage(who, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* ---- latency samples (microseconds) ---------------------------------------- */

typedef struct {
    uint32_t *v;
    size_t n, cap;
} samples;

static void sample_add(samples *s, int64_t ns) {
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 65536;
        s->v = realloc(s->v, s->cap * sizeof(uint32_t));
        if (!s->v) die("out of memory");
    }
    int64_t us = ns / 1000;
    s->v[s->n++] = us < 0 ? 0 : (us > 0xffffffffLL ? 0xffffffffU : (uint32_t)us);
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double percentile_ms(samples *s, double p) {
    if (!s->n) return -1;
    size_t i = (size_t)(p * (s->n - 1));
    return s->v[i] / 1000.0;
}

static void print_latency(const char *name, samples *s) {
    qsort(s->v, s->n, sizeof(uint32_t), cmp_u32);
    printf("\"%s\": {\"samples\": %zu, \"p50_ms\": %.3f, \"p90_ms\": %.3f, \"p99_ms\": %.3f, "
           "\"p999_ms\": %.3f, \"max_ms\": %.3f}",
           name, s->n, percentile_ms(s, 0.50), percentile_ms(s, 0.90), percentile_ms(s, 0.99),
           percentile_ms(s, 0.999), s->n ? s->v[s->n - 1] / 1000.0 : -1);
}

/* ---- connections ----------------------------------------------------------- */

enum { PRODUCER, FOLLOWER };
enum { BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE };
enum { CH_SIZE, CH_DATA, CH_DATA_CR, CH_TRAILER, CH_DONE };

typedef struct conn {
    int fd, kind, index;
    /* outgoing */
    char *out;
    size_t out_len, out_off, out_cap;
    int want_write;
    /* incoming: response head, then body */
    char head[16384];
    size_t head_len;
    int head_done, status, body_mode;
    int64_t content_length, body_bytes;
    int ch_state;
    int64_t ch_left;
    char size_line[64];
    size_t size_len;
    int done, failed;
    int64_t started_ns, first_byte_ns, done_ns;
    /* lines: the line being assembled, and how many lines arrived */
    char line[512];
    size_t line_len;
    int64_t lines;
    /* producer bookkeeping */
    int64_t to_send, sent, next_due_ns, lines_sent;
    int body_finished;
    /* follower throttle */
    int64_t rate, budget, budget_at_ns;
    int paused;
    struct conn *producer;
} conn;

static int epfd;
static samples latency;
static int measure_lines;
static char *filler;

static int connect_to(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS)
        die("connect: %s", strerror(errno));
    return fd;
}

static void watch(conn *c) {
    struct epoll_event ev = {.events = (c->paused ? 0 : EPOLLIN) | (c->want_write ? EPOLLOUT : 0),
                             .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
}

static conn *new_conn(int port, int kind, int index) {
    conn *c = calloc(1, sizeof(conn));
    if (!c) die("out of memory");
    c->fd = connect_to(port);
    c->kind = kind;
    c->index = index;
    c->started_ns = now_ns();
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
    return c;
}

static void queue(conn *c, const char *data, size_t n) {
    if (c->out_off == c->out_len) c->out_off = c->out_len = 0;
    if (c->out_len + n > c->out_cap) {
        if (c->out_off) {
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
            c->out_len -= c->out_off;
            c->out_off = 0;
        }
        if (c->out_len + n > c->out_cap) {
            c->out_cap = (c->out_len + n) * 2;
            c->out = realloc(c->out, c->out_cap);
            if (!c->out) die("out of memory");
        }
    }
    memcpy(c->out + c->out_len, data, n);
    c->out_len += n;
}

/* Write what is queued; returns 1 if everything went out. */
static int flush(conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t n = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
        if (n < 0) {
            if (errno == EAGAIN) break;
            if (errno == EINTR) continue;
            c->failed = 1;
            return 0;
        }
        c->out_off += n;
    }
    int empty = c->out_off == c->out_len;
    if (empty == c->want_write) {
        c->want_write = !empty;
        watch(c);
    }
    return empty;
}

/* A line of a followed stream arrived whole. */
static void line_arrived(conn *c, const char *line, size_t n) {
    c->lines++;
    if (measure_lines && n >= 20) {
        int64_t sent = 0;
        for (int i = 0; i < 20; i++) sent = sent * 10 + (line[i] - '0');
        sample_add(&latency, now_ns() - sent);
    }
}

static void body_data(conn *c, const char *data, size_t n) {
    c->body_bytes += n;
    if (!measure_lines) return;
    for (size_t i = 0; i < n; i++) {
        if (data[i] == '\n') {
            line_arrived(c, c->line, c->line_len);
            c->line_len = 0;
        } else if (c->line_len < sizeof c->line) {
            c->line[c->line_len++] = data[i];
        }
    }
}

static void parse_head(conn *c) {
    c->head[c->head_len] = 0;
    c->status = atoi(c->head + 9);
    char *cl = strcasestr(c->head, "\r\ncontent-length:");
    char *te = strcasestr(c->head, "\r\ntransfer-encoding: chunked");
    if (te) c->body_mode = BODY_CHUNKED;
    else if (cl) {
        c->body_mode = BODY_LENGTH;
        c->content_length = atoll(cl + 17);
    } else c->body_mode = BODY_CLOSE;
}

/* Feed received bytes through the response parser. */
static void received(conn *c, char *data, size_t n) {
    if (!c->first_byte_ns) c->first_byte_ns = now_ns();
    size_t i = 0;
    while (!c->head_done && i < n) {
        if (c->head_len >= sizeof c->head - 1) die("response head too long");
        c->head[c->head_len++] = data[i++];
        if (c->head_len >= 4 && !memcmp(c->head + c->head_len - 4, "\r\n\r\n", 4)) {
            if (!memcmp(c->head + 9, "100", 3)) {
                c->head_len = 0;
                continue;
            }
            c->head_done = 1;
            parse_head(c);
            if (c->body_mode == BODY_LENGTH && c->content_length == 0) {
                c->done = 1;
                c->done_ns = now_ns();
            }
        }
    }
    while (i < n && !c->done) {
        if (c->body_mode == BODY_LENGTH || c->body_mode == BODY_CLOSE) {
            size_t take = n - i;
            if (c->body_mode == BODY_LENGTH && (int64_t)take > c->content_length - c->body_bytes)
                take = c->content_length - c->body_bytes;
            body_data(c, data + i, take);
            i += take;
            if (c->body_mode == BODY_LENGTH && c->body_bytes == c->content_length) {
                c->done = 1;
                c->done_ns = now_ns();
            }
            continue;
        }
        switch (c->ch_state) {
        case CH_SIZE:
            if (data[i] == '\n') {
                c->size_line[c->size_len] = 0;
                c->ch_left = strtoll(c->size_line, NULL, 16);
                c->size_len = 0;
                c->ch_state = c->ch_left ? CH_DATA : CH_TRAILER;
            } else if (c->size_len < sizeof c->size_line - 1 && data[i] != '\r') {
                c->size_line[c->size_len++] = data[i];
            }
            i++;
            break;
        case CH_DATA: {
            size_t take = n - i;
            if ((int64_t)take > c->ch_left) take = c->ch_left;
            body_data(c, data + i, take);
            c->ch_left -= take;
            i += take;
            if (!c->ch_left) c->ch_state = CH_DATA_CR;
            break;
        }
        case CH_DATA_CR:
            if (data[i] == '\n') c->ch_state = CH_SIZE;
            i++;
            break;
        case CH_TRAILER:
            /* "0\r\n" was read; the final "\r\n" ends the body (no trailers from Loom). */
            if (data[i] == '\n') {
                c->done = 1;
                c->done_ns = now_ns();
            }
            i++;
            break;
        }
    }
}

static char rbuf[256 * 1024];

/* Read what is available (within the follower's budget); returns 0 on EOF/error. */
static int drain(conn *c) {
    for (;;) {
        size_t want = sizeof rbuf;
        if (c->rate) {
            if (c->budget <= 0) {
                c->paused = 1;
                watch(c);
                return 1;
            }
            if ((int64_t)want > c->budget) want = c->budget;
        }
        ssize_t n = read(c->fd, rbuf, want);
        if (n > 0) {
            if (c->rate) c->budget -= n;
            received(c, rbuf, n);
            continue;
        }
        if (n == 0) {
            if (c->body_mode == BODY_CLOSE && c->head_done) {
                c->done = 1;
                c->done_ns = now_ns();
            }
            return 0;
        }
        if (errno == EAGAIN) return 1;
        if (errno == EINTR) continue;
        return 0;
    }
}

static void send_get(conn *c, const char *stream) {
    char req[512];
    int n = snprintf(req, sizeof req, "GET /stream/%s HTTP/1.1\r\nHost: loom\r\n\r\n", stream);
    queue(c, req, n);
    flush(c);
}

static void send_post_head(conn *c, const char *stream) {
    char req[512];
    int n = snprintf(req, sizeof req,
                     "POST /stream/%s HTTP/1.1\r\nHost: loom\r\nTransfer-Encoding: chunked\r\n\r\n",
                     stream);
    queue(c, req, n);
    flush(c);
}

/* Run the loop until stop() says so or the deadline passes; tick() runs every turn. */
static void loop(int (*stop)(void), void (*tick)(int64_t), int64_t deadline_ns) {
    struct epoll_event events[MAX_EVENTS];
    while (!stop()) {
        int64_t now = now_ns();
        if (deadline_ns && now > deadline_ns) die("timed out");
        if (tick) tick(now);
        int n = epoll_wait(epfd, events, MAX_EVENTS, 1);
        for (int i = 0; i < n; i++) {
            conn *c = events[i].data.ptr;
            if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                if (!drain(c) && !c->done) {
                    c->failed = 1;
                    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
                }
            }
            if (events[i].events & EPOLLOUT) flush(c);
        }
    }
}

/* ---- loopback and append: the machine's limits ------------------------------- */

/* Listen on an ephemeral loopback port; its address goes to *sa. */
static int listen_loopback(struct sockaddr_in *sa, int backlog) {
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof *sa;
    if (bind(listener, (struct sockaddr *)sa, sizeof *sa) || listen(listener, backlog) ||
        getsockname(listener, (struct sockaddr *)sa, &len))
        die("listen: %s", strerror(errno));
    return listener;
}

static int mode_loopback(int64_t bytes) {
    struct sockaddr_in sa;
    int listener = listen_loopback(&sa, 1);
    int pipefd[2];
    if (pipe(pipefd)) die("pipe");
    pid_t pid = fork();
    if (pid == 0) { /* the receiving process */
        int fd = accept(listener, NULL, NULL);
        char *buf = malloc(CHUNK);
        int64_t got = 0, start = 0;
        while (got < bytes) {
            ssize_t n = read(fd, buf, CHUNK);
            if (n <= 0) break;
            if (!start) start = now_ns();
            got += n;
        }
        int64_t end = now_ns();
        double cpu = cpu_seconds(RUSAGE_SELF);
        if (write(pipefd[1], &start, sizeof start) < 0 || write(pipefd[1], &end, sizeof end) < 0 ||
            write(pipefd[1], &cpu, sizeof cpu) < 0)
            _exit(1);
        _exit(got == bytes ? 0 : 1);
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) die("connect: %s", strerror(errno));
    char *buf = malloc(CHUNK);
    memset(buf, 'x', CHUNK);
    int64_t start = now_ns();
    for (int64_t sent = 0; sent < bytes;) {
        ssize_t n = write(fd, buf, CHUNK);
        if (n <= 0) die("write: %s", strerror(errno));
        sent += n;
    }
    close(fd);
    int status;
    waitpid(pid, &status, 0);
    int64_t rstart, rend;
    double rcpu;
    if (read(pipefd[0], &rstart, sizeof rstart) != sizeof rstart ||
        read(pipefd[0], &rend, sizeof rend) != sizeof rend ||
        read(pipefd[0], &rcpu, sizeof rcpu) != sizeof rcpu)
        die("receiver failed");
    double seconds = (rend - start) / 1e9;
    printf("{\"bytes\": %lld, \"seconds\": %.6f, \"mib_per_s\": %.2f, \"loadgen_cpu_s\": %.3f}\n",
           (long long)bytes, seconds, bytes / seconds / 1048576.0,
           cpu_seconds(RUSAGE_SELF) + rcpu);
    return 0;
}

static int mode_append(const char *path, int64_t bytes) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
    if (fd < 0) die("open %s: %s", path, strerror(errno));
    char *buf = malloc(CHUNK);
    memset(buf, 'x', CHUNK);
    int64_t start = now_ns();
    for (int64_t done = 0; done < bytes;) {
        ssize_t n = write(fd, buf, CHUNK);
        if (n <= 0) die("write: %s", strerror(errno));
        done += n;
    }
    int64_t written = now_ns();
    fsync(fd);
    int64_t synced = now_ns();
    close(fd);
    unlink(path);
    printf("{\"bytes\": %lld, \"seconds\": %.6f, \"mib_per_s\": %.2f, "
           "\"with_fsync_seconds\": %.6f, \"with_fsync_mib_per_s\": %.2f}\n",
           (long long)bytes, (written - start) / 1e9, bytes / ((written - start) / 1e9) / 1048576.0,
           (synced - start) / 1e9, bytes / ((synced - start) / 1e9) / 1048576.0);
    return 0;
}

/* ---- W1 bulk, W4 slow: one producer flat out, one follower --------------------- */

static conn *the_producer, *the_follower;
static int producing;

static void pump_bulk(conn *p) {
    /* Keep about 1 MiB queued: enough to fill the socket, little enough to stay honest. */
    static char head[16];
    int head_n = snprintf(head, sizeof head, "%x\r\n", CHUNK);
    while (p->sent < p->to_send && p->out_len - p->out_off < 1024 * 1024) {
        queue(p, head, head_n);
        queue(p, filler, CHUNK);
        queue(p, "\r\n", 2);
        p->sent += CHUNK;
    }
    if (p->sent >= p->to_send && !p->body_finished) {
        queue(p, "0\r\n\r\n", 5);
        p->body_finished = 1;
    }
    flush(p);
}

static int bulk_done(void) {
    return the_producer->done && (the_follower == NULL || the_follower->done ||
                                  the_follower->rate);
}

static void bulk_tick(int64_t now) {
    conn *p = the_producer;
    if (p->failed) die("producer connection failed");
    if (the_follower && the_follower->failed && !the_follower->rate) die("follower failed");
    if (producing && !p->body_finished && p->out_len - p->out_off < 1024 * 1024) pump_bulk(p);
    conn *f = the_follower;
    if (f && f->rate) { /* refill the slow follower's budget, 1 ms at a time */
        if (!f->budget_at_ns) f->budget_at_ns = now;
        int64_t earned = (now - f->budget_at_ns) * f->rate / 1000000000LL;
        if (earned > 0) {
            f->budget += earned;
            if (f->budget > f->rate / 10) f->budget = f->rate / 10;
            f->budget_at_ns = now;
            if (f->paused && f->budget > 0) {
                f->paused = 0;
                watch(f);
            }
        }
    }
}

static int wait_head_done(void) { return the_producer->head_done && (!the_follower || the_follower->head_done); }

static int mode_bulk(int port, const char *stream, int64_t bytes, int64_t rate) {
    filler = malloc(CHUNK);
    memset(filler, 'b', CHUNK);
    the_producer = new_conn(port, PRODUCER, 0);
    send_post_head(the_producer, stream);
    the_follower = NULL;
    loop(wait_head_done, NULL, now_ns() + 30000000000LL);
    if (the_producer->status != 201) die("POST answered %d", the_producer->status);
    /* the stream exists: attach the follower, then start producing */
    the_producer->head_done = 1;
    the_follower = new_conn(port, FOLLOWER, 0);
    if (rate) {
        int small = 64 * 1024;
        setsockopt(the_follower->fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
        the_follower->rate = rate;
    }
    send_get(the_follower, stream);
    loop(wait_head_done, bulk_tick, now_ns() + 30000000000LL);
    the_producer->to_send = bytes;
    double cpu0 = cpu_seconds(RUSAGE_SELF);
    int64_t start = now_ns();
    producing = 1;
    /* The producer's response ends (the final chunk) once every byte is stored. */
    the_producer->head_done = 1;
    the_producer->ch_state = CH_SIZE;
    loop(bulk_done, bulk_tick, start + 600000000000LL);
    int64_t stored = the_producer->done_ns;
    conn *f = the_follower;
    printf("{\"bytes\": %lld, \"ingest_seconds\": %.6f, \"ingest_mib_per_s\": %.2f, "
           "\"follower_bytes\": %lld, \"follower_seconds\": %.6f, \"follower_mib_per_s\": %.2f, "
           "\"loadgen_cpu_s\": %.3f}\n",
           (long long)bytes, (stored - start) / 1e9, bytes / ((stored - start) / 1e9) / 1048576.0,
           (long long)f->body_bytes, f->done ? (f->done_ns - start) / 1e9 : -1.0,
           f->done ? f->body_bytes / ((f->done_ns - start) / 1e9) / 1048576.0 : -1.0,
           cpu_seconds(RUSAGE_SELF) - cpu0);
    return 0;
}

static int follower_done(void) { return the_follower->done || the_follower->failed; }

static int mode_replay(int port, const char *stream) {
    the_follower = new_conn(port, FOLLOWER, 0);
    double cpu0 = cpu_seconds(RUSAGE_SELF);
    int64_t start = now_ns();
    send_get(the_follower, stream);
    loop(follower_done, NULL, start + 600000000000LL);
    conn *f = the_follower;
    if (f->failed || f->status != 200) die("replay failed (status %d)", f->status);
    double seconds = (f->done_ns - start) / 1e9;
    printf("{\"bytes\": %lld, \"seconds\": %.6f, \"mib_per_s\": %.2f, \"loadgen_cpu_s\": %.3f}\n",
           (long long)f->body_bytes, seconds, f->body_bytes / seconds / 1048576.0,
           cpu_seconds(RUSAGE_SELF) - cpu0);
    return 0;
}

/* ---- W2/W3 lines: paced producers, followers measuring latency ------------------- */

static conn **producers, **followers;
static int n_producers, n_followers;
static int64_t interval_ns, end_ns;
static int line_bytes;
static char *line_buf;

static void write_line(conn *p, int64_t now) {
    int n = snprintf(line_buf, line_bytes + 32, "%x\r\n%020lld", line_bytes, (long long)now);
    memset(line_buf + n, 'l', line_bytes - 20 - 1);
    n += line_bytes - 20 - 1;
    line_buf[n++] = '\n';
    line_buf[n++] = '\r';
    line_buf[n++] = '\n';
    queue(p, line_buf, n);
    flush(p);
    p->lines_sent++;
}

static void lines_tick(int64_t now) {
    static int announced;
    if (now >= end_ns && !announced) {
        announced = 1;
        fprintf(stderr, "phase: end\n");
        fflush(stderr);
    }
    for (int i = 0; i < n_producers; i++) {
        conn *p = producers[i];
        if (p->failed) die("producer %d failed", i);
        if (p->body_finished) continue;
        if (now >= end_ns) {
            queue(p, "0\r\n\r\n", 5);
            flush(p);
            p->body_finished = 1;
            continue;
        }
        while (p->next_due_ns <= now && p->next_due_ns < end_ns) {
            write_line(p, now);
            p->next_due_ns += interval_ns;
        }
    }
}

static int lines_done(void) {
    for (int i = 0; i < n_followers; i++)
        if (!followers[i]->done && !followers[i]->failed) return 0;
    for (int i = 0; i < n_producers; i++)
        if (!producers[i]->done && !producers[i]->failed) return 0;
    return 1;
}

static int heads_done(void) {
    for (int i = 0; i < n_producers; i++)
        if (!producers[i]->head_done) return 0;
    for (int i = 0; i < n_followers; i++)
        if (!followers[i]->head_done) return 0;
    return 1;
}

static int mode_lines(int port, int np, int fe, int interval_ms, int seconds, int lb) {
    n_producers = np;
    n_followers = np * fe;
    line_bytes = lb;
    line_buf = malloc(lb + 64);
    interval_ns = interval_ms * 1000000LL;
    producers = calloc(np, sizeof(conn *));
    followers = calloc(n_followers, sizeof(conn *));
    char name[64];
    int64_t pid = getpid();
    for (int i = 0; i < np; i++) {
        producers[i] = new_conn(port, PRODUCER, i);
        snprintf(name, sizeof name, "lines-%lld-%d", (long long)pid, i);
        send_post_head(producers[i], name);
    }
    n_followers = 0;
    loop(heads_done, NULL, now_ns() + 60000000000LL);
    for (int i = 0; i < np; i++) {
        if (producers[i]->status != 201) die("POST answered %d", producers[i]->status);
        producers[i]->ch_state = CH_SIZE;
        snprintf(name, sizeof name, "lines-%lld-%d", (long long)pid, i);
        for (int j = 0; j < fe; j++) {
            conn *f = new_conn(port, FOLLOWER, i * fe + j);
            f->producer = producers[i];
            followers[n_followers++] = f;
            send_get(f, name);
            if (n_followers % 100 == 0) loop(heads_done, NULL, now_ns() + 60000000000LL);
        }
    }
    loop(heads_done, NULL, now_ns() + 60000000000LL);
    for (int i = 0; i < n_followers; i++)
        if (followers[i]->status != 200) die("GET answered %d", followers[i]->status);
    measure_lines = 1;
    int64_t start = now_ns();
    end_ns = start + seconds * 1000000000LL;
    for (int i = 0; i < np; i++) /* spread producers over the interval */
        producers[i]->next_due_ns = start + (interval_ns * i) / np;
    double cpu0 = cpu_seconds(RUSAGE_SELF);
    fprintf(stderr, "phase: steady\n");
    fflush(stderr);
    loop(lines_done, lines_tick, end_ns + 60000000000LL);
    int64_t sent = 0, expected = 0, got = 0, failed = 0;
    for (int i = 0; i < np; i++) sent += producers[i]->lines_sent;
    for (int i = 0; i < n_followers; i++) {
        expected += followers[i]->producer->lines_sent;
        got += followers[i]->lines;
        failed += followers[i]->failed;
    }
    printf("{\"producers\": %d, \"followers\": %d, \"lines_sent\": %lld, \"deliveries_expected\": %lld, "
           "\"deliveries\": %lld, \"followers_failed\": %lld, \"seconds\": %d, \"loadgen_cpu_s\": %.3f, ",
           np, n_followers, (long long)sent, (long long)expected, (long long)got, (long long)failed,
           seconds, cpu_seconds(RUSAGE_SELF) - cpu0);
    print_latency("latency", &latency);
    printf("}\n");
    return 0;
}

/* ---- W5: GET latency of random streams ------------------------------------------- */

static int mode_get(int port, const char *prefix, int count, int requests) {
    samples ttfb = {0}, total = {0};
    char name[128];
    srand(getpid());
    conn *c = NULL;
    double cpu0 = cpu_seconds(RUSAGE_SELF);
    for (int r = 0; r < requests; r++) {
        if (c) { /* keep-alive: reuse the connection with a fresh parser */
            int fd = c->fd;
            memset(c, 0, sizeof *c);
            c->fd = fd;
            c->kind = FOLLOWER;
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            epoll_ctl(epfd, EPOLL_CTL_MOD, fd, &ev);
        } else {
            c = new_conn(port, FOLLOWER, 0);
        }
        the_follower = c;
        snprintf(name, sizeof name, "%s-%07d", prefix, rand() % count);
        int64_t start = now_ns();
        send_get(c, name);
        loop(follower_done, NULL, start + 10000000000LL);
        if (c->failed || c->status != 200) die("GET %s answered %d", name, c->status);
        sample_add(&ttfb, c->first_byte_ns - start);
        sample_add(&total, c->done_ns - start);
    }
    printf("{\"requests\": %d, \"loadgen_cpu_s\": %.3f, ", requests, cpu_seconds(RUSAGE_SELF) - cpu0);
    print_latency("first_byte", &ttfb);
    printf(", ");
    print_latency("complete", &total);
    printf("}\n");
    return 0;
}

/* ---- the fan-out floor: C sender, C receiver, no Loom ------------------------------ */

static int mode_fanout(int n, int interval_ms, int seconds, int lb) {
    struct sockaddr_in sa;
    int listener = listen_loopback(&sa, 4096);
    int *out = calloc(n, sizeof(int)), *in = calloc(n, sizeof(int));
    for (int i = 0; i < n; i++) {
        in[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(in[i], (struct sockaddr *)&sa, sizeof sa)) die("connect: %s", strerror(errno));
        out[i] = accept(listener, NULL, NULL);
        int one = 1;
        setsockopt(out[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    int64_t start = now_ns() + 200000000LL, end = start + seconds * 1000000000LL;
    pid_t pid = fork();
    if (pid == 0) { /* the receiver: every line, from every socket */
        for (int i = 0; i < n; i++) {
            fcntl(in[i], F_SETFL, O_NONBLOCK);
            conn *c = calloc(1, sizeof(conn));
            c->fd = in[i];
            c->head_done = 1; /* raw lines, no HTTP */
            c->body_mode = BODY_CLOSE;
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            epoll_ctl(epfd, EPOLL_CTL_ADD, in[i], &ev);
        }
        measure_lines = 1;
        struct epoll_event events[MAX_EVENTS];
        double cpu0 = cpu_seconds(RUSAGE_SELF);
        while (now_ns() < end + 500000000LL) {
            int k = epoll_wait(epfd, events, MAX_EVENTS, 10);
            for (int i = 0; i < k; i++) {
                conn *c = events[i].data.ptr;
                ssize_t got = read(c->fd, rbuf, sizeof rbuf);
                if (got > 0) body_data(c, rbuf, got);
            }
        }
        printf("{\"followers\": %d, \"receiver_cpu_s\": %.3f, ", n, cpu_seconds(RUSAGE_SELF) - cpu0);
        print_latency("latency", &latency);
        printf("}\n");
        fflush(stdout);
        _exit(0);
    }
    char *line = malloc(lb + 1);
    memset(line, 'l', lb);
    line[lb - 1] = '\n';
    while (now_ns() < start) usleep(1000);
    for (int64_t due = start; due < end; due += interval_ms * 1000000LL) {
        while (now_ns() < due) usleep(200);
        char stamp[32];
        snprintf(stamp, sizeof stamp, "%020lld", (long long)now_ns());
        memcpy(line, stamp, 20);
        for (int i = 0; i < n; i++)
            if (write(out[i], line, lb) != lb) die("write: %s", strerror(errno));
    }
    int status;
    waitpid(pid, &status, 0);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) die("usage: see the comment at the top of loadgen.c");
    epfd = epoll_create1(EPOLL_CLOEXEC);
    const char *mode = argv[1];
    if (!strcmp(mode, "loopback") && argc == 3) return mode_loopback(atoll(argv[2]));
    if (!strcmp(mode, "append") && argc == 4) return mode_append(argv[2], atoll(argv[3]));
    if (!strcmp(mode, "bulk") && argc == 5)
        return mode_bulk(atoi(argv[2]), argv[3], atoll(argv[4]), 0);
    if (!strcmp(mode, "slow") && argc == 6)
        return mode_bulk(atoi(argv[2]), argv[3], atoll(argv[4]), atoll(argv[5]));
    if (!strcmp(mode, "replay") && argc == 4) return mode_replay(atoi(argv[2]), argv[3]);
    if (!strcmp(mode, "lines") && argc == 8)
        return mode_lines(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), atoi(argv[6]),
                          atoi(argv[7]));
    if (!strcmp(mode, "fanout") && argc == 6)
        return mode_fanout(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    if (!strcmp(mode, "get") && argc == 6)
        return mode_get(atoi(argv[2]), argv[3], atoi(argv[4]), atoi(argv[5]));
    die("unknown mode or wrong arguments: %s", mode);
    return 2;
}
