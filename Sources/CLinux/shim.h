#ifndef CASFS_CLINUX_SHIM_H
#define CASFS_CLINUX_SHIM_H
// Linux calls that Swift's Glibc module does not export.
#include <sys/types.h>
#include <sys/xattr.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <stdio.h>
#include <sys/vfs.h>
#include <fcntl.h>
#include <malloc.h>
#include <sys/syscall.h>
#include <sys/resource.h>
#include <spawn.h>
#include <unistd.h>
#include <signal.h>

// ioctl is variadic in C, which Swift cannot call.
static inline int casfs_ioctl(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }

// Swift 6 cannot touch the C `stdout` global: line-buffer it from here.
static inline void casfs_line_buffer_stdout(void) { setvbuf(stdout, NULL, _IOLBF, 0); }
// The filesystem type (statfs f_type) of the filesystem holding `path`; -1 on error.
static inline long casfs_filesystem_type(const char *path) {
    struct statfs s;
    return statfs(path, &s) == 0 ? (long)s.f_type : -1;
}
// pidfd_open(2) and pidfd_send_signal(2) (glibc 2.36 has wrappers only in
// <sys/pidfd.h>): -1 and errno on failure (ENOSYS before Linux 5.3).
static inline int casfs_pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }
static inline int casfs_pidfd_send_signal(int pidfd, int sig) {
    return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}
// posix_spawn: close every descriptor from `from` up in the child (glibc 2.34).
static inline int casfs_spawn_addclosefrom(posix_spawn_file_actions_t *actions, int from) {
    return posix_spawn_file_actions_addclosefrom_np(actions, from);
}
// pipe2(fds, O_CLOEXEC) (declared only with _GNU_SOURCE).
static inline int casfs_pipe_cloexec(int fds[2]) { return (int)syscall(SYS_pipe2, fds, O_CLOEXEC); }
// glibc's POSIX_SPAWN_SETSID (declared only with _GNU_SOURCE).
static inline short casfs_posix_spawn_setsid(void) { return 0x80; }
// accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK) (declared only with _GNU_SOURCE).
static inline int casfs_accept_cloexec_nonblock(int fd) {
    return (int)syscall(SYS_accept4, fd, NULL, NULL, 02000000 | 04000);
}
// mkostemp is a GNU extension: declared here for Swift.
extern int mkostemp(char *template_, int flags);
static inline int casfs_mkstemp_cloexec(char *template_) { return mkostemp(template_, O_CLOEXEC); }
// O_DIRECT is only visible to Swift under _GNU_SOURCE.
static inline int casfs_o_direct(void) { return __O_DIRECT; }
// glibc's allocator: return freed memory to the system, bound the arenas.
static inline int casfs_malloc_trim(size_t pad) { return malloc_trim(pad); }
static inline int casfs_mallopt_arena_max(int n) { return mallopt(M_ARENA_MAX, n); }
static inline int casfs_mallopt_mmap_threshold(int n) { return mallopt(M_MMAP_THRESHOLD, n); }
#endif
