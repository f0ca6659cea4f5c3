/* A W-tcp L4 relay on io_uring, to measure whether batching the relay's socket
 * operations into one io_uring_enter per loop beats nginx stream's recv/send per
 * message (the sockmap prototype beside it did not). Not part of the product.
 *
 * One thread per core, each with its own SO_REUSEPORT listener and ring
 * (SINGLE_ISSUER | DEFER_TASKRUN). Each client connection is paired with a fresh
 * upstream connection (round robin over the backends). Each direction keeps one
 * recv in flight; a completed recv becomes a send of the same bytes to the peer;
 * a completed send re-arms the recv. All SQEs a loop pass produces go to the
 * kernel in one io_uring_submit_and_wait.
 *
 *   gcc -O2 [-DEPOLL] -o /tmp/ur/urproxy bench/prototypes/uring_l4.c -luring -lpthread
 *   /tmp/ur/urproxy LISTEN_PORT BACKEND_PORT...
 *
 * -DEPOLL waits the way a tokio thread would (an eventfd the ring signals, in
 * an epoll set) instead of in io_uring_enter: the shape switchyard-uring took.
 * -DMULTISHOT keeps one multishot receive armed per direction, taking buffers
 * from a ring of provided buffers per thread, instead of one receive per message.
 * Needs apt-get install -y liburing-dev.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 16384
#define THREADS 2

enum { OP_ACCEPT = 1, OP_RECV, OP_SEND };

struct pair;
#define QMAX 64
struct dir {
    struct pair *pair;
    int from, to;
    int len, sent;
#ifdef MULTISHOT
    int q[QMAX], qlen[QMAX], qhead, qcount, eof, done;
#else
    char buf[BUF];
#endif
};
#ifdef MULTISHOT
#define NBUFS 1024
static __thread struct io_uring_buf_ring *br;
static __thread char *bufs;
#endif
struct pair {
    struct dir d[2];
    int open; /* directions still open */
};

static int listen_port, nbackends, backends[16];

static unsigned long tag(void *p, int op) { return (unsigned long)p | (unsigned long)op; }

static void arm_recv(struct io_uring *ring, struct dir *d)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (!sqe) { io_uring_submit(ring); sqe = io_uring_get_sqe(ring); }
#ifdef MULTISHOT
    io_uring_prep_recv_multishot(sqe, d->from, NULL, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = 0;
#else
    io_uring_prep_recv(sqe, d->from, d->buf, BUF, 0);
#endif
    io_uring_sqe_set_data64(sqe, tag(d, OP_RECV));
}

static void arm_send(struct io_uring *ring, struct dir *d)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    if (!sqe) { io_uring_submit(ring); sqe = io_uring_get_sqe(ring); }
#ifdef MULTISHOT
    char *base = bufs + (size_t)d->q[d->qhead] * BUF;
#else
    char *base = d->buf;
#endif
    io_uring_prep_send(sqe, d->to, base + d->sent, d->len - d->sent, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, tag(d, OP_SEND));
}

static void arm_accept(struct io_uring *ring, int lfd)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
    io_uring_prep_multishot_accept(sqe, lfd, NULL, NULL, 0);
    io_uring_sqe_set_data64(sqe, OP_ACCEPT);
}

static void dir_done(struct dir *d)
{
    struct pair *p = d->pair;
#ifdef MULTISHOT
    if (d->done) return;
    d->done = 1;
#endif
    shutdown(d->to, SHUT_WR);
    if (--p->open == 0) {
        close(p->d[0].from);
        close(p->d[1].from);
        /* not freed: the prototype's connections live for the whole run */
    }
}

static void *worker(void *arg)
{
    long id = (long)arg;
    int one = 1, next = (int)id;
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(listen_port) };
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(lfd, (void *)&a, sizeof a) || listen(lfd, 1024)) { perror("listen"); exit(1); }

    struct io_uring ring;
        struct io_uring_params params = { .flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN };
    if (io_uring_queue_init_params(1024, &ring, &params)) { perror("io_uring"); exit(1); }
    arm_accept(&ring, lfd);
#ifdef MULTISHOT
    /* liburing 2.3 has no io_uring_setup_buf_ring: register page-aligned memory. */
    if (posix_memalign((void **)&br, 4096, NBUFS * sizeof(struct io_uring_buf))) exit(1);
    io_uring_buf_ring_init(br);
    struct io_uring_buf_reg reg = { .ring_addr = (unsigned long)br, .ring_entries = NBUFS, .bgid = 0 };
    int err = io_uring_register_buf_ring(&ring, &reg, 0);
    if (err) { fprintf(stderr, "buf ring: %d\n", err); exit(1); }
    bufs = malloc((size_t)NBUFS * BUF);
    for (int i = 0; i < NBUFS; i++)
        io_uring_buf_ring_add(br, bufs + (size_t)i * BUF, BUF, i, io_uring_buf_ring_mask(NBUFS), i);
    io_uring_buf_ring_advance(br, NBUFS);
#endif
#ifdef EPOLL
    /* The shape a tokio thread would have: an eventfd the ring signals when
     * completions wait (deferred ones included) sits in the thread's epoll set
     * next to its other sockets; io_uring_submit_and_get_events runs them. */
    int efd = eventfd(0, EFD_NONBLOCK), ep = epoll_create1(0);
    io_uring_register_eventfd(&ring, efd);
    struct epoll_event ev = { .events = EPOLLIN | EPOLLET };
    epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev);
#endif

    for (;;) {
#ifdef EPOLL
        io_uring_submit_and_get_events(&ring);
        if (!io_uring_cq_ready(&ring)) {
            uint64_t v;
            epoll_wait(ep, &ev, 1, -1);
            if (read(efd, &v, 8) < 0 && errno != EAGAIN) perror("eventfd");
            continue;
        }
#else
        io_uring_submit_and_wait(&ring, 1);
#endif
        struct io_uring_cqe *cqe;
        unsigned head, n = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            n++;
            unsigned long t = cqe->user_data;
            int op = t & 7, res = cqe->res;
            if (op == OP_ACCEPT) {
                if (!(cqe->flags & IORING_CQE_F_MORE)) arm_accept(&ring, lfd);
                if (res < 0) continue;
                int up = socket(AF_INET, SOCK_STREAM, 0);
                struct sockaddr_in b = { .sin_family = AF_INET, .sin_port = htons(backends[next++ % nbackends]) };
                inet_pton(AF_INET, "127.0.0.1", &b.sin_addr);
                if (connect(up, (void *)&b, sizeof b)) { close(up); close(res); continue; }
                setsockopt(res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                setsockopt(up, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                struct pair *p = aligned_alloc(8, sizeof *p);
                p->open = 2;
                p->d[0] = (struct dir){ .pair = p, .from = res, .to = up };
                p->d[1] = (struct dir){ .pair = p, .from = up, .to = res };
                arm_recv(&ring, &p->d[0]);
                arm_recv(&ring, &p->d[1]);
                continue;
            }
            struct dir *d = (struct dir *)(t & ~7UL);
#ifdef MULTISHOT
            if (op == OP_RECV) {
                int more = cqe->flags & IORING_CQE_F_MORE;
                if (res > 0) {
                    int slot = (d->qhead + d->qcount) % QMAX;
                    d->q[slot] = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
                    d->qlen[slot] = res;
                    if (d->qcount++ == 0) { d->len = res; d->sent = 0; arm_send(&ring, d); }
                    if (!more) arm_recv(&ring, d);
                } else if (res == -ENOBUFS) {
                    arm_recv(&ring, d);
                } else if (!more) {
                    d->eof = 1;
                    if (d->qcount == 0) dir_done(d);
                }
            } else {
                if (res < 0) { dir_done(d); continue; }
                d->sent += res;
                if (d->sent < d->len) { arm_send(&ring, d); continue; }
                io_uring_buf_ring_add(br, bufs + (size_t)d->q[d->qhead] * BUF, BUF, d->q[d->qhead], io_uring_buf_ring_mask(NBUFS), 0);
                io_uring_buf_ring_advance(br, 1);
                d->qhead = (d->qhead + 1) % QMAX;
                if (--d->qcount > 0) { d->len = d->qlen[d->qhead]; d->sent = 0; arm_send(&ring, d); }
                else if (d->eof) dir_done(d);
            }
            continue;
#endif
            if (op == OP_RECV) {
                if (res <= 0) { dir_done(d); continue; }
                d->len = res;
                d->sent = 0;
                arm_send(&ring, d);
            } else {
                if (res < 0) { dir_done(d); continue; }
                d->sent += res;
                if (d->sent < d->len) arm_send(&ring, d);
                else arm_recv(&ring, d);
            }
        }
        io_uring_cq_advance(&ring, n);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) { fprintf(stderr, "usage: %s LISTEN_PORT BACKEND_PORT...\n", argv[0]); return 2; }
    listen_port = atoi(argv[1]);
    for (int i = 2; i < argc && nbackends < 16; i++) backends[nbackends++] = atoi(argv[i]);
    pthread_t t[THREADS];
    for (long i = 0; i < THREADS; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    return 0;
}
