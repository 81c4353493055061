#ifndef CASFS_CFUSE_SHIM_H
#define CASFS_CFUSE_SHIM_H
// Must precede the libfuse headers (module maps cannot define macros).
#define FUSE_USE_VERSION 314
#include <stddef.h>
#include <fuse_lowlevel.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <stddef.h>

// From libfuse 3.17 several entry points are macros; these wrappers keep the
// Swift side independent of that.
static inline struct fuse_session *casfs_session_new(struct fuse_args *args,
        const struct fuse_lowlevel_ops *op, size_t op_size, void *userdata) {
    return fuse_session_new(args, op, op_size, userdata);
}

static inline int casfs_session_loop_mt(struct fuse_session *se, unsigned int max_threads) {
    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    if (cfg == NULL) return -1;
    fuse_loop_cfg_set_clone_fd(cfg, 0);
    if (max_threads > 0) fuse_loop_cfg_set_max_threads(cfg, max_threads);
    fuse_loop_cfg_set_idle_threads(cfg, max_threads > 0 && max_threads < 10 ? max_threads : 10);
    int rc = fuse_session_loop_mt(se, cfg);
    fuse_loop_cfg_destroy(cfg);
    return rc;
}

// Bitfields of fuse_file_info, set from C to avoid layout surprises.
static inline void casfs_fi_set_keep_cache(struct fuse_file_info *fi, int on) { fi->keep_cache = on ? 1 : 0; }
static inline void casfs_fi_set_direct_io(struct fuse_file_info *fi, int on) { fi->direct_io = on ? 1 : 0; }
static inline void casfs_fi_set_nonseekable(struct fuse_file_info *fi, int on) { fi->nonseekable = on ? 1 : 0; }
static inline void casfs_fi_set_cache_readdir(struct fuse_file_info *fi, int on) { fi->cache_readdir = on ? 1 : 0; }
static inline void casfs_fi_set_noflush(struct fuse_file_info *fi, int on) { fi->noflush = on ? 1 : 0; }

// fuse_bufvec initialiser (FUSE_BUFVEC_INIT is a macro).
static inline struct fuse_bufvec casfs_bufvec_fd(int fd, size_t size, off_t pos) {
    struct fuse_bufvec v = FUSE_BUFVEC_INIT(size);
    v.buf[0].flags = (enum fuse_buf_flags)(FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK);
    v.buf[0].fd = fd;
    v.buf[0].pos = pos;
    return v;
}
#endif
