"""GPU and hosts: NVIDIA's DCGM exporter and Prometheus's node exporter.

DCGM fields (dcgm-exporter's default counters plus the profiling ones the stack's
counters file adds): GPU_UTIL is a percentage (0-100), FB_USED/FB_FREE are MiB,
POWER_USAGE watts, GPU_TEMP degrees Celsius, XID_ERRORS the last XID code, and
PROF_PIPE_TENSOR_ACTIVE a ratio (0-1) of cycles the tensor cores were busy.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders.dashboard import Dashboard

from monitors.dashboards.panels import (
    RATE,
    Query,
    Section,
    dashboard,
    graph,
    label_variable,
    rate_sum,
)

UID = "bastion-gpu"
GPU = 'instance=~"$instance"'
HOST = 'instance=~"$host"'
NIC = f'{HOST},device!="lo"'
LOST = ("receive_drop", "transmit_drop", "receive_errs", "transmit_errs")
PACKETS = ("receive_packets", "transmit_packets")


def _nic_sum(counters: tuple[str, ...]) -> str:
    """The per-second sum of node_network_<counter>_total over a host's interfaces."""
    return " + ".join(
        f"sum by (instance) (rate(node_network_{c}_total{{{NIC}}}[{RATE}]))" for c in counters
    )


def _gpu_section() -> Section:
    by = "instance, gpu"
    legend = "{{instance}} GPU {{gpu}}"
    return Section(
        "GPUs (DCGM)",
        [
            graph(
                "GPU utilisation",
                "percent",
                "Share of time a kernel ran on the GPU; the alert fires above 90 % for 5 m.",
                [Query(f"avg by ({by}) (DCGM_FI_DEV_GPU_UTIL{{{GPU}}})", legend)],
                min_val=0,
                max_val=100,
            ),
            graph(
                "Tensor-core activity",
                "percentunit",
                "Share of cycles the tensor pipes were busy: real saturation, where "
                "utilisation only says a kernel was running.",
                [Query(f"avg by ({by}) (DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{{GPU}}})", legend)],
                min_val=0,
                max_val=1,
            ),
            graph(
                "GPU memory used",
                "percentunit",
                "Frame buffer used over used plus free (vLLM preallocates its share at start).",
                [
                    Query(
                        f"max by ({by}) (DCGM_FI_DEV_FB_USED{{{GPU}}} "
                        f"/ (DCGM_FI_DEV_FB_USED{{{GPU}}} + DCGM_FI_DEV_FB_FREE{{{GPU}}}))",
                        legend,
                    )
                ],
                min_val=0,
                max_val=1,
            ),
            graph(
                "Power draw",
                "watt",
                "Board power of each GPU.",
                [Query(f"max by ({by}) (DCGM_FI_DEV_POWER_USAGE{{{GPU}}})", legend)],
            ),
            graph(
                "Temperature",
                "celsius",
                "GPU die and memory temperature.",
                [
                    Query(f"max by ({by}) (DCGM_FI_DEV_GPU_TEMP{{{GPU}}})", f"die {legend}"),
                    Query(f"max by ({by}) (DCGM_FI_DEV_MEMORY_TEMP{{{GPU}}})", f"memory {legend}"),
                ],
            ),
            graph(
                "XID errors",
                "none",
                "The last XID error code the driver reported (0: none); any other value is "
                "a hardware or driver fault to look up in NVIDIA's XID catalogue.",
                [Query(f"max by ({by}) (DCGM_FI_DEV_XID_ERRORS{{{GPU}}})", legend)],
                min_val=0,
            ),
            graph(
                "Generated tokens per second per watt",
                "suffix: tokens/J",
                "vLLM's generated tokens per second over the GPUs' power draw: energy "
                "efficiency of serving (tokens per joule).",
                [
                    Query(
                        rate_sum("vllm:generation_tokens_total", "", 'model_name=~"$model"')
                        + f"\n/\nsum(DCGM_FI_DEV_POWER_USAGE{{{GPU}}})",
                        "tokens/J",
                    )
                ],
                width=24,
            ),
        ],
    )


def _host_section() -> Section:
    return Section(
        "Hosts (node exporter)",
        [
            graph(
                "Memory used",
                "percentunit",
                "1 - MemAvailable / MemTotal; the alert fires above 90 % for 5 m.",
                [
                    Query(
                        f"1 - (node_memory_MemAvailable_bytes{{{HOST}}} "
                        f"/ node_memory_MemTotal_bytes{{{HOST}}})",
                        "{{instance}}",
                    )
                ],
                min_val=0,
                max_val=1,
            ),
            graph(
                "CPU busy",
                "percentunit",
                "Share of CPU time not idle, over all cores.",
                [
                    Query(
                        "1 - avg by (instance) "
                        f'(rate(node_cpu_seconds_total{{{HOST},mode="idle"}}[{RATE}]))',
                        "{{instance}}",
                    )
                ],
                min_val=0,
                max_val=1,
            ),
            graph(
                "Network errors and drops",
                "pps",
                "Packets dropped or errored per second, received and sent.",
                [
                    Query(
                        rate_sum("node_network_receive_drop_total", "instance", NIC),
                        "rx drop {{instance}}",
                    ),
                    Query(
                        rate_sum("node_network_transmit_drop_total", "instance", NIC),
                        "tx drop {{instance}}",
                    ),
                    Query(
                        rate_sum("node_network_receive_errs_total", "instance", NIC),
                        "rx errors {{instance}}",
                    ),
                    Query(
                        rate_sum("node_network_transmit_errs_total", "instance", NIC),
                        "tx errors {{instance}}",
                    ),
                ],
            ),
            graph(
                "Packet loss",
                "percentunit",
                "Dropped and errored packets over all packets; the alert fires above 0.1 %.",
                [
                    Query(
                        f"({_nic_sum(LOST)})\n/\n({_nic_sum(PACKETS)})",
                        "{{instance}}",
                    )
                ],
                min_val=0,
            ),
        ],
    )


def build() -> Dashboard:
    return dashboard(
        UID,
        "Bastion / GPU and hosts",
        "Are the GPUs and hosts healthy and used well: utilisation, tensor activity, "
        "memory, power, temperature, XID errors, tokens per watt, host memory, CPU, network.",
        [_gpu_section(), _host_section()],
        [
            label_variable("instance", "instance", "DCGM_FI_DEV_GPU_UTIL", "DCGM exporter"),
            label_variable("host", "instance", "node_uname_info", "Host"),
            label_variable("model", "model_name", "vllm:num_requests_running", "Model"),
        ],
    )
