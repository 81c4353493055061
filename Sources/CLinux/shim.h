#ifndef CASFS_CLINUX_SHIM_H
#define CASFS_CLINUX_SHIM_H
// Linux calls that Swift's Glibc module does not export.
#include <sys/types.h>
#include <sys/xattr.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <stdio.h>
#include <sys/vfs.h>

// ioctl is variadic in C, which Swift cannot call.
static inline int casfs_ioctl(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }

// Swift 6 cannot touch the C `stdout` global: line-buffer it from here.
static inline void casfs_line_buffer_stdout(void) { setvbuf(stdout, NULL, _IOLBF, 0); }
// The filesystem type (statfs f_type) of the filesystem holding `path`; -1 on error.
static inline long casfs_filesystem_type(const char *path) {
    struct statfs s;
    return statfs(path, &s) == 0 ? (long)s.f_type : -1;
}
#endif
