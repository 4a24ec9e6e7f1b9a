import { $, nav, params } from "./ui.js";

nav();
$("#roots").textContent = params().roots ?? "";
