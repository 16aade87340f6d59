// `companion devices`: the GPUs this process sees, with the identities servers and clients use.
#include <cstdio>
#include <iostream>

#include "cli/commands.hpp"
#include "cli/output.hpp"
#include "common/util.hpp"
#include "memory/cuda_backend.hpp"

namespace companion::cli {

int run_devices(bool json) {
  auto gpus = memory::list_gpus();
  if (!gpus.ok()) {
    if (json)
      std::cout << json_text(to_json(gpus.error())) << std::endl;
    else
      std::fprintf(stderr, "companion devices: %s\n", gpus.error().to_string().c_str());
    return 1;
  }
  if (json) {
    nlohmann::json j = nlohmann::json::array();
    for (const auto& g : *gpus)
      j.push_back({{"ordinal", g.ordinal},
                   {"uuid", g.uuid},
                   {"pci_bus_id", g.pci_bus_id},
                   {"name", g.name},
                   {"total_memory", g.total_memory}});
    std::cout << json_text(j, 2) << std::endl;
    return 0;
  }
  std::vector<std::vector<std::string>> rows;
  for (const auto& g : *gpus)
    rows.push_back(
        {std::to_string(g.ordinal), g.uuid, g.pci_bus_id, g.name, format_bytes(g.total_memory)});
  std::cout << render_table({"ORDINAL", "UUID", "PCI BUS ID", "NAME", "MEMORY"}, rows);
  return 0;
}

}  // namespace companion::cli
