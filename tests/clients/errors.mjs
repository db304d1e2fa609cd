// Sends one chat request with the npm OpenAI SDK and with the Vercel AI SDK, and prints, as
// one JSON line per SDK, what the error each raised shows the user.
//   node errors.mjs <base URL> <api key> <request as JSON>
import OpenAI from "openai";
import { createOpenAI } from "@ai-sdk/openai";
import { generateText } from "ai";

const [baseURL, apiKey, requestJSON] = process.argv.slice(2);
const request = JSON.parse(requestJSON);

async function openaiNode() {
  const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
  try {
    await client.chat.completions.create(request);
    return { sdk: "openai-node", raised: false };
  } catch (error) {
    return {
      sdk: "openai-node",
      raised: true,
      status: error.status,
      message: error.message,
      type: error.type ?? null,
      param: error.param ?? null,
      code: error.code ?? null,
    };
  }
}

async function vercelAI() {
  const provider = createOpenAI({ baseURL, apiKey });
  const { model, messages, ...settings } = request;
  try {
    await generateText({ model: provider.chat(model), messages, maxRetries: 0, ...settings });
    return { sdk: "vercel-ai", raised: false };
  } catch (error) {
    return { sdk: "vercel-ai", raised: true, status: error.statusCode, message: error.message };
  }
}

for (const result of [await openaiNode(), await vercelAI()]) {
  console.log(JSON.stringify(result));
}
