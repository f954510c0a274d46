# Rewrites CUDA sources into C++ the host model (host_model.hpp) compiles with g++; run as
#   cmake -DIN=<file> -DOUT=<file> -P translate.cmake
# Two rewrites, each checked to leave nothing of its kind behind:
#   NAME<<<CONFIG>>>(ARGS);   ->  ::host_model::launch_kernel(::host_model::LaunchSite{__FILE__, __LINE__},
#                                   [&] { ::host_model::kernel_arguments(ARGS).run(
#                                         [&](auto&&... a) { NAME(forwarded a...); }); }, CONFIG);
#                                 (NAME: the statement's text before <<<, from the start of its line;
#                                 the model checks the pointers among ARGS before it runs the kernel)
#   extern __shared__ [__align__(N)] TYPE NAME[];
#                             ->  TYPE* const NAME = static_cast<TYPE*>(::host_model::dynamic_shared());
# The lines keep their numbers (a rewritten statement keeps its line breaks), so compiler
# messages point at the original source.
cmake_minimum_required(VERSION 3.20)
if(NOT DEFINED IN OR NOT DEFINED OUT)
  message(FATAL_ERROR "translate.cmake: pass -DIN=<CUDA source> -DOUT=<C++ file>")
endif()
file(READ "${IN}" text)

# A launch statement: indentation, NAME (which may be split after a "::" and may end a line before
# <<<), <<<CONFIG>>>, (ARGS); with no ';' inside.
set(launch "\n([ \t]*)(([A-Za-z_][A-Za-z0-9_]*::[ \t]*\n[ \t]*)?[^\n;{}<]+(<[^\n;{}]*>)?)([ \t]*\n?[ \t]*)<<<([^;]*)>>>\\(([^;]*)\\);")
string(REGEX REPLACE "${launch}" "\n\\1::host_model::launch_kernel(::host_model::LaunchSite{__FILE__, __LINE__}, [&] { ::host_model::kernel_arguments(\\7).run([&](auto&&... host_model_args) { \\2\\5(static_cast<decltype(host_model_args)&&>(host_model_args)...); }); }, \\6);" text "${text}")
string(FIND "${text}" "<<<" left)
if(NOT left EQUAL -1)
  string(SUBSTRING "${text}" ${left} 120 where)
  message(FATAL_ERROR "translate.cmake: a kernel launch in ${IN} was not rewritten: ${where}")
endif()

set(shared "extern __shared__ (__align__\\([0-9]+\\) )?([^;\n]*[^ ;\n])[ ]+([A-Za-z_][A-Za-z0-9_]*)\\[\\];")
string(REGEX REPLACE "${shared}" "\\2* const \\3 = static_cast<\\2*>(::host_model::dynamic_shared());" text "${text}")
string(FIND "${text}" "extern __shared__" left)
if(NOT left EQUAL -1)
  message(FATAL_ERROR "translate.cmake: an extern __shared__ array in ${IN} was not rewritten")
endif()

# Written only when changed, so that what includes it is not rebuilt for nothing.
if(EXISTS "${OUT}")
  file(READ "${OUT}" old)
  if(old STREQUAL text)
    return()
  endif()
endif()
file(WRITE "${OUT}" "${text}")
