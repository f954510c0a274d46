# Finds mixmoe's dependencies; used by the build tree and by the installed package.
# Creates mixmoe::fftw (FFTW 3, float and double), mixmoe::sentencepiece (the tokenizer
# library and its trainer) and, when MIXMOE_USE_BLAS, mixmoe::blas. nlohmann_json (JSON of
# checkpoint headers and configs) comes with its own CMake package.
include(CMakeFindDependencyMacro)
find_dependency(Eigen3 3.4 NO_MODULE)
set(THREADS_PREFER_PTHREAD_FLAG ON)
find_dependency(Threads)

if(NOT TARGET mixmoe::fftw)
  find_path(MIXMOE_FFTW_INCLUDE_DIR fftw3.h)
  find_library(MIXMOE_FFTW_LIB fftw3)
  find_library(MIXMOE_FFTWF_LIB fftw3f)
  if(NOT MIXMOE_FFTW_INCLUDE_DIR OR NOT MIXMOE_FFTW_LIB OR NOT MIXMOE_FFTWF_LIB)
    message(FATAL_ERROR "mixmoe needs FFTW 3 (float and double): install the Debian package libfftw3-dev")
  endif()
  add_library(mixmoe::fftw INTERFACE IMPORTED)
  set_target_properties(mixmoe::fftw PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${MIXMOE_FFTW_INCLUDE_DIR}"
    INTERFACE_LINK_LIBRARIES "${MIXMOE_FFTW_LIB};${MIXMOE_FFTWF_LIB}")
endif()

if(NOT TARGET mixmoe::blas)
  find_path(MIXMOE_CBLAS_INCLUDE_DIR cblas.h PATH_SUFFIXES openblas-pthread openblas)
  find_library(MIXMOE_BLAS_LIB NAMES openblas)
  if(MIXMOE_CBLAS_INCLUDE_DIR AND MIXMOE_BLAS_LIB)
    add_library(mixmoe::blas INTERFACE IMPORTED)
    set_target_properties(mixmoe::blas PROPERTIES
      INTERFACE_INCLUDE_DIRECTORIES "${MIXMOE_CBLAS_INCLUDE_DIR}"
      INTERFACE_LINK_LIBRARIES "${MIXMOE_BLAS_LIB}")
  endif()
endif()
if(MIXMOE_USE_BLAS AND NOT TARGET mixmoe::blas)
  message(FATAL_ERROR "MIXMOE_USE_BLAS is ON but OpenBLAS was not found: install libopenblas-dev, or configure with -DMIXMOE_USE_BLAS=OFF to use Eigen's GEMM")
endif()

find_dependency(nlohmann_json 3)

if(NOT TARGET mixmoe::sentencepiece)
  find_path(MIXMOE_SPM_INCLUDE_DIR sentencepiece_processor.h)
  find_library(MIXMOE_SPM_LIB sentencepiece)
  find_library(MIXMOE_SPM_TRAIN_LIB sentencepiece_train)
  if(NOT MIXMOE_SPM_INCLUDE_DIR OR NOT MIXMOE_SPM_LIB OR NOT MIXMOE_SPM_TRAIN_LIB)
    message(FATAL_ERROR "mixmoe needs SentencePiece (library and trainer): install the Debian package libsentencepiece-dev")
  endif()
  add_library(mixmoe::sentencepiece INTERFACE IMPORTED)
  set_target_properties(mixmoe::sentencepiece PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${MIXMOE_SPM_INCLUDE_DIR}"
    INTERFACE_LINK_LIBRARIES "${MIXMOE_SPM_TRAIN_LIB};${MIXMOE_SPM_LIB}")
endif()
