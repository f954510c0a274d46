// The CPU run of cases_training.hpp (host compiler).
#include "cases_training.hpp"

namespace mixmoe_parity {
void cpu_cases_training(Results& r) { cases_training<mixmoe::Cpu>(r); }
static const Registrar register_training("training", cpu_cases_training);
}  // namespace mixmoe_parity
