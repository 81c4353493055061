#ifndef CASFS_CHIREDIS_SHIM_H
#define CASFS_CHIREDIS_SHIM_H
#include <hiredis/hiredis.h>
#endif
