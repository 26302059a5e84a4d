/* Included by bindgen only (see .cargo/config.toml). */
#ifndef DASK_SPANK_COMPAT_H
#define DASK_SPANK_COMPAT_H
#include <slurm/spank.h>
#include <slurm/slurm_version.h>
#if SLURM_VERSION_NUMBER < SLURM_VERSION_NUM(23, 0, 0)
extern spank_err_t spank_prepend_task_argv(spank_t spank, int argc, const char *argv[]);
#endif
#endif
