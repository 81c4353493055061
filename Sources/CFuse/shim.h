#ifndef CASFS_CFUSE_SHIM_H
#define CASFS_CFUSE_SHIM_H
#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>
#endif
