// The CPU run of cases_rows.hpp (host compiler).
#include "cases_rows.hpp"

namespace mixmoe_parity {
void cpu_cases_rows(Results& r) { cases_rows<mixmoe::Cpu>(r); }
static const Registrar register_rows("rows", cpu_cases_rows);
}  // namespace mixmoe_parity
