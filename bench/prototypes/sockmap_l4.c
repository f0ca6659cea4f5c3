// Prototype: L4 proxy whose bytes move by a sockmap sk_skb verdict redirect.
// Measurement only, not product code: the bytes queued before the sockets
// enter the map are not ordered against the redirected ones (see RESULTS.md).
// Build: mkdir -p /tmp/sk && gcc -O2 -o /tmp/sk/skproxy bench/prototypes/sockmap_l4.c -lpthread
// Usage: skproxy LISTEN_PORT B1 B2 B3 (root; run by sockmap_vs_nginx.py)
#define _GNU_SOURCE
#include <linux/bpf.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <stddef.h>
#include <errno.h>

static int bpf(int cmd, union bpf_attr *a) { return syscall(__NR_bpf, cmd, a, sizeof(*a)); }
struct key { unsigned rip, lip, rport, lport; };
static int map_fd;
static long fallback_bytes;

#define INSN(c, d, s, o, i) ((struct bpf_insn){c, d, s, o, i})
static int load_prog(void) {
  struct bpf_insn p[] = {
    INSN(BPF_ALU64 | BPF_MOV | BPF_X, 6, 1, 0, 0),
    INSN(BPF_LDX | BPF_W | BPF_MEM, 2, 6, offsetof(struct __sk_buff, remote_ip4), 0),
    INSN(BPF_STX | BPF_W | BPF_MEM, 10, 2, -16, 0),
    INSN(BPF_LDX | BPF_W | BPF_MEM, 2, 6, offsetof(struct __sk_buff, local_ip4), 0),
    INSN(BPF_STX | BPF_W | BPF_MEM, 10, 2, -12, 0),
    INSN(BPF_LDX | BPF_W | BPF_MEM, 2, 6, offsetof(struct __sk_buff, remote_port), 0),
    INSN(BPF_STX | BPF_W | BPF_MEM, 10, 2, -8, 0),
    INSN(BPF_LDX | BPF_W | BPF_MEM, 2, 6, offsetof(struct __sk_buff, local_port), 0),
    INSN(BPF_STX | BPF_W | BPF_MEM, 10, 2, -4, 0),
    INSN(BPF_ALU64 | BPF_MOV | BPF_X, 1, 6, 0, 0),
    INSN(BPF_LD | BPF_DW | BPF_IMM, 2, BPF_PSEUDO_MAP_FD, 0, 0), INSN(0, 0, 0, 0, 0),
    INSN(BPF_ALU64 | BPF_MOV | BPF_X, 3, 10, 0, 0),
    INSN(BPF_ALU64 | BPF_ADD | BPF_K, 3, 0, 0, -16),
    INSN(BPF_ALU64 | BPF_MOV | BPF_K, 4, 0, 0, 0),
    INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_sk_redirect_hash),
    INSN(BPF_JMP | BPF_JNE | BPF_K, 0, 0, 1, 0),
    INSN(BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, 1),
    INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
  };
  p[10].imm = map_fd;
  static char log[65536];
  union bpf_attr a = {0};
  a.prog_type = BPF_PROG_TYPE_SK_SKB;
  a.insns = (unsigned long)p; a.insn_cnt = sizeof(p) / sizeof(p[0]);
  a.license = (unsigned long)"GPL";
  a.log_buf = (unsigned long)log; a.log_size = sizeof(log); a.log_level = 1;
  a.expected_attach_type = BPF_SK_SKB_VERDICT;
  int fd = bpf(BPF_PROG_LOAD, &a);
  if (fd < 0) { fprintf(stderr, "load: %s\n%s\n", strerror(errno), log); exit(1); }
  return fd;
}

static struct key key_of(int fd) {
  struct sockaddr_in l, r; socklen_t n = sizeof(l);
  getsockname(fd, (void *)&l, &n); n = sizeof(r); getpeername(fd, (void *)&r, &n);
  struct key k = { r.sin_addr.s_addr, l.sin_addr.s_addr, (unsigned)r.sin_port << 16, ntohs(l.sin_port) };
  return k;
}
static void put(int partner_of, int fd) {
  struct key k = key_of(partner_of);
  union bpf_attr a = {0};
  a.map_fd = map_fd; a.key = (unsigned long)&k; a.value = (unsigned long)&fd; a.flags = BPF_ANY;
  if (bpf(BPF_MAP_UPDATE_ELEM, &a) < 0) perror("update");
}

struct pair { int c, u; };
static void *watch(void *arg) {
  struct pair *p = arg; char buf[65536];
  int open_c = 1, open_u = 1;
  while (open_c || open_u) {
    struct pollfd f[2] = {{p->c, open_c ? POLLIN : 0, 0}, {p->u, open_u ? POLLIN : 0, 0}};
    if (poll(f, 2, -1) < 0) break;
    for (int i = 0; i < 2; i++) {
      if (!(f[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      int from = i ? p->u : p->c, to = i ? p->c : p->u;
      ssize_t n = read(from, buf, sizeof(buf));
      if (n <= 0) { shutdown(to, SHUT_WR); if (i) open_u = 0; else open_c = 0; continue; }
      __atomic_add_fetch(&fallback_bytes, n, __ATOMIC_RELAXED);
      write(to, buf, n);
    }
  }
  close(p->c); close(p->u); free(p); return NULL;
}

int main(int argc, char **argv) {
  union bpf_attr a = {0};
  a.map_type = BPF_MAP_TYPE_SOCKHASH; a.key_size = sizeof(struct key); a.value_size = 4; a.max_entries = 65536;
  map_fd = bpf(BPF_MAP_CREATE, &a);
  if (map_fd < 0) { perror("map"); return 1; }
  int prog = load_prog();
  memset(&a, 0, sizeof(a));
  a.target_fd = map_fd; a.attach_bpf_fd = prog; a.attach_type = BPF_SK_SKB_VERDICT;
  if (bpf(BPF_PROG_ATTACH, &a) < 0) { perror("attach"); return 1; }
  int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  struct sockaddr_in sa = {AF_INET, htons(atoi(argv[1])), {htonl(INADDR_LOOPBACK)}};
  if (bind(ls, (void *)&sa, sizeof(sa)) || listen(ls, 1024)) { perror("listen"); return 1; }
  fprintf(stderr, "ready\n");
  for (unsigned rr = 0;; rr++) {
    int c = accept(ls, NULL, NULL);
    if (c < 0) continue;
    int u = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in ba = {AF_INET, htons(atoi(argv[2 + rr % 3])), {htonl(INADDR_LOOPBACK)}};
    if (connect(u, (void *)&ba, sizeof(ba))) { close(c); close(u); continue; }
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(u, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    put(c, u);  // data arriving on c goes out of u
    put(u, c);
    struct pair *p = malloc(sizeof(*p)); p->c = c; p->u = u;
    pthread_t t; pthread_create(&t, NULL, watch, p); pthread_detach(t);
    if (rr % 50 == 49) fprintf(stderr, "fallback bytes so far: %ld\n", fallback_bytes);
  }
}
