#ifndef CASFS_CLINUX_SHIM_H
#define CASFS_CLINUX_SHIM_H
// Linux calls that Swift's Glibc module does not export.
#include <sys/types.h>
#include <sys/xattr.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <stdio.h>
#include <sys/vfs.h>
#include <sys/syscall.h>
#include <sys/resource.h>
#include <spawn.h>
#include <unistd.h>
#include <signal.h>
#include <fcntl.h>

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
// Gives freed heap memory back to the system (glibc's malloc_trim).
#include <malloc.h>
static inline int casfs_malloc_trim(void) { return malloc_trim(0); }
#endif
