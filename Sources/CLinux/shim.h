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

// ioctl is variadic in C, which Swift cannot call.
static inline int casfs_ioctl(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }

// Swift 6 cannot touch the C `stdout` global: line-buffer it from here.
static inline void casfs_line_buffer_stdout(void) { setvbuf(stdout, NULL, _IOLBF, 0); }
// The filesystem type (statfs f_type) of the filesystem holding `path`; -1 on error.
static inline long casfs_filesystem_type(const char *path) {
    struct statfs s;
    return statfs(path, &s) == 0 ? (long)s.f_type : -1;
}
// mkostemp is a GNU extension: declared here for Swift.
extern int mkostemp(char *template_, int flags);
static inline int casfs_mkstemp_cloexec(char *template_) { return mkostemp(template_, O_CLOEXEC); }
// O_DIRECT is only visible to Swift under _GNU_SOURCE.
static inline int casfs_o_direct(void) { return __O_DIRECT; }
// glibc's allocator: return freed memory to the system, bound the arenas.
static inline int casfs_malloc_trim(size_t pad) { return malloc_trim(pad); }
static inline int casfs_mallopt_arena_max(int n) { return mallopt(M_ARENA_MAX, n); }
#endif
