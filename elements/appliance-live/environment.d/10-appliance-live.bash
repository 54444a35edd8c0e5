# Kernel modules the initramfs carries (with what they need): enough to find
# the root on a CD, USB stick, SD card, SATA/SAS/NVMe disk or RAID volume, and
# to fetch it over the network for a PXE boot. Udev loads those the hardware
# asks for; every other module loads from the root after switch_root.
export DIB_APPLIANCE_INITRAMFS_MODULES=${DIB_APPLIANCE_INITRAMFS_MODULES:-"virtio_blk virtio_scsi virtio_net ahci ata_piix ata_generic nvme sd_mod sr_mod xhci_pci ehci_pci ohci_pci uhci_hcd usb_storage uas usbhid hid_generic mmc_block sdhci_pci sdhci_acpi megaraid_sas mpt3sas mpi3mr hpsa smartpqi aacraid vmw_pvscsi hv_storvsc hv_netvsc xen_blkfront xen_netfront e1000 e1000e igb igc ixgbe i40e ice bnxt_en mlx4_en mlx5_core r8169 tg3 bnx2 bnx2x vmxnet3 8139cp squashfs overlay loop ext4 vfat isofs nls_cp437 nls_ascii nls_utf8 nls_iso8859_1 crc32c_generic crc32c_intel"}
# How the root's squashfs is compressed (mksquashfs options): zstd reads
# several times faster than xz, which matters where the CPU is slow (an
# emulated one above all); 1 MiB blocks make it smaller and each read larger.
export DIB_APPLIANCE_SQUASHFS_OPTIONS=${DIB_APPLIANCE_SQUASHFS_OPTIONS:-"-comp zstd -Xcompression-level 19 -b 1M"}
