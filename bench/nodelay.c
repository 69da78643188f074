/* An LD_PRELOAD shim for experiments (bench/garage.sh, GARAGE_NODELAY=1):
 * sets TCP_NODELAY on every TCP socket the process connects or accepts,
 * i.e. turns Nagle's algorithm off where the program left it on.
 * NODELAY_ACCEPTED_PORTS=P1,P2,...: only on sockets accepted on those
 * local ports (e.g. Garage's S3 API, not its RPC), to tell which leg
 * the delays are on. Build:
 * cc -O2 -shared -fPIC -o nodelay.so nodelay.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* Whether an accepted socket gets TCP_NODELAY (see the header). */
static int wanted(int fd) {
  const char *ports = getenv("NODELAY_ACCEPTED_PORTS");
  if (!ports || !*ports) return 1;
  struct sockaddr_storage a;
  socklen_t len = sizeof a;
  if (getsockname(fd, (struct sockaddr *)&a, &len) != 0) return 0;
  int port = a.ss_family == AF_INET ? ntohs(((struct sockaddr_in *)&a)->sin_port)
           : a.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&a)->sin6_port) : -1;
  for (const char *p = ports; *p;) {
    char *end;
    long v = strtol(p, &end, 10);
    if (end == p) break;
    if (v == port) return 1;
    p = *end == ',' ? end + 1 : end;
  }
  return 0;
}

static void nodelay(int fd) {
  int one = 1, saved = errno;
  /* fails harmlessly (and is ignored) on a unix socket */
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  errno = saved;
}

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
  static int (*real)(int, const struct sockaddr *, socklen_t);
  if (!real) real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
  const char *only = getenv("NODELAY_ACCEPTED_PORTS");
  if (addr && (addr->sa_family == AF_INET || addr->sa_family == AF_INET6) && !(only && *only)) nodelay(fd);
  return real(fd, addr, len);
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
  static int (*real)(int, struct sockaddr *, socklen_t *, int);
  if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
  int r = real(fd, addr, len, flags);
  if (r >= 0 && wanted(r)) nodelay(r);
  return r;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len) {
  static int (*real)(int, struct sockaddr *, socklen_t *);
  if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
  int r = real(fd, addr, len);
  if (r >= 0 && wanted(r)) nodelay(r);
  return r;
}
