# Cross-compiling for 64-bit Arm Linux with Debian's cross toolchain (gcc-aarch64-linux-gnu,
# g++-aarch64-linux-gnu); scripts/test-neon.sh runs the result under qemu-user.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(ACTSPARSE_CROSS_PREFIX "aarch64-linux-gnu-" CACHE STRING "Prefix of the cross compiler's executables")
set(ACTSPARSE_CROSS_SYSROOT "/usr/aarch64-linux-gnu" CACHE PATH "Target libraries and headers")

set(CMAKE_C_COMPILER "${ACTSPARSE_CROSS_PREFIX}gcc")
set(CMAKE_CXX_COMPILER "${ACTSPARSE_CROSS_PREFIX}g++")

# Target libraries and packages from the sysroot only; programs (ccache, git, python) from the host.
set(CMAKE_FIND_ROOT_PATH "${ACTSPARSE_CROSS_SYSROOT}")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# try_run() checks at configure time would otherwise need hand-written answers.
find_program(ACTSPARSE_QEMU_AARCH64 qemu-aarch64)
if(ACTSPARSE_QEMU_AARCH64)
    set(CMAKE_CROSSCOMPILING_EMULATOR "${ACTSPARSE_QEMU_AARCH64};-L;${ACTSPARSE_CROSS_SYSROOT}")
endif()
